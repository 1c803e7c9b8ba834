"""Parameter groups and the learning-rate schedule shared by the training recipe and the toy pretraining."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def lr_groups(model: torch.nn.Module, lr: float, multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by learning rate (lr x the multiplier of their top-level module)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault(lr * multipliers.get(name.split(".")[0], 1.0), []).append(parameter)
    return [{"params": parameters, "lr": group_lr} for group_lr, parameters in groups.items()]


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The lr factor of each step: linear warmup, then a cosine from 1 down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
