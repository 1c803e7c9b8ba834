"""The training loss of one batch, as a pure function: what the recipe, validation and tests all call."""

from __future__ import annotations

from typing import Any

from textbind.data.collate import Batch, attention_mask_for
from textbind.model.mim import MIMModel, MIMOutput


def compute_loss(model: Any, batch: Batch, *, return_logits: bool = False) -> MIMOutput:
    """The model's loss on one batch (mean over supervised tokens); pure, no engine needed.

    `model` is a MIMModel or a DeepSpeed engine wrapping one (its forward runs the engine's hooks).
    """
    module: MIMModel = getattr(model, "module", model)
    batch = batch.to(module.device, dtype=module.dtype)
    attn_implementation = getattr(module.language_model.config, "_attn_implementation", None)
    return model(
        input_ids=batch.input_ids,
        attention_mask=attention_mask_for(batch, module.dtype, attn_implementation),
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        targets=batch.targets,
        return_logits=return_logits,
    )
