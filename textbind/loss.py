"""The training loss of one batch, as a pure function: what the recipe, validation and tests all call.

The loss of an optimizer step is the mean over every supervised token of the step: all its micro-batches
on all ranks, padded or packed alike. A mean of micro-batch means would weigh a token of a short
micro-batch more than one of a long micro-batch (and a packed layout would change the weights). So the
loop asks for summed micro-batch losses and divides them by the step's token count:

    step_tokens = step_target_tokens(micro_batches)            # all-reduced over ranks
    for batch in micro_batches:
        output = compute_loss(engine, batch, reduction="sum")
        engine.backward(scale_for_backward(output.loss, step_tokens, world_size, accumulation))

`scale_for_backward` undoes what the engine does to the loss and the gradients (DeepSpeed divides the
loss by the accumulation steps in `backward` and averages gradients over ranks), so the accumulated
gradient is exactly that of sum(token losses) / step_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from textbind.data.collate import Batch
from textbind.model.attention import attention_inputs
from textbind.model.mim import MIMModel, MIMOutput


def compute_loss(model: Any, batch: Batch, *, return_logits: bool = False, reduction: str = "mean") -> MIMOutput:
    """The model's loss on one batch; pure, no engine needed.

    reduction "mean": mean over the batch's supervised tokens; "sum": their sum (divide by the step's
    token count, see the module docstring). `output.num_target_tokens` is the count either way.
    `model` is a MIMModel or a DeepSpeed engine wrapping one (its forward runs the engine's hooks).
    On the flex path the returned logits cover the bucket-padded length (padding rows carry no target).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    module: MIMModel = getattr(model, "module", model)
    batch = batch.to(module.device, dtype=module.dtype)
    batch, attention_mask = attention_inputs(module, batch)
    return model(
        input_ids=batch.input_ids,
        attention_mask=attention_mask,
        position_ids=batch.position_ids,
        pixel_values=batch.pixel_values,
        targets=batch.targets,
        return_logits=return_logits,
        loss_reduction=reduction,
    )


def step_target_tokens(batches: Iterable[Batch], group: Any = None) -> int:
    """Supervised tokens of one optimizer step: these micro-batches, summed over the ranks of `group`."""
    total = torch.tensor(sum(batch.num_target_tokens for batch in batches), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
    return int(total)


def scale_for_backward(summed_loss: torch.Tensor, step_tokens: int, world_size: int = 1,
                       gradient_accumulation: int = 1) -> torch.Tensor:
    """The value to hand the engine's backward so that the step's gradient is that of the token mean.

    The engine divides by `gradient_accumulation` and averages over `world_size` ranks; multiplying
    by both first cancels that. Pass gradient_accumulation=1 to a plain `loss.backward()`.
    """
    return summed_loss * (world_size * gradient_accumulation / max(step_tokens, 1))
