"""One training recipe for both stages: setup -> fit -> save; the stages differ only in configuration."""

from __future__ import annotations

from textbind.data.collate import Batch, attention_mask_for
from textbind.model.mim import MIMModel, MIMOutput


def compute_loss(model: MIMModel, batch: Batch, *, return_logits: bool = False) -> MIMOutput:
    """The model's loss on one batch (mean over supervised tokens); pure, no engine involved."""
    batch = batch.to(model.device, dtype=model.dtype)
    return model(
        input_ids=batch.input_ids,
        attention_mask=attention_mask_for(batch, model.dtype),
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        targets=batch.targets,
        return_logits=return_logits,
    )
