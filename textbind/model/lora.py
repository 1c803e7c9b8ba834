"""Low-rank adapters on the language model (PEFT), and their merge into plain weights for export."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAPTER_NAME = "default"


def add_lora(language_model: nn.Module, settings: Any) -> list[str]:
    """Inject LoRA adapters (a `textbind.config.LoraConfig`) into `language_model` in place.

    The model keeps its class and attribute names (no PeftModel wrapper), so the MIM model's forward
    and checkpoint keys stay as they are; only the adapters train in the language model afterwards.
    Returns the names of the adapted modules.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    inject_adapter_in_model(config, language_model, adapter_name=ADAPTER_NAME)
    adapted = [name for name, module in language_model.named_modules() if is_lora_layer(module)]
    if not adapted:
        raise ValueError(f"train.lora.target_modules {settings.target_modules} match no layer of the language model")
    for name, parameter in language_model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    language_model.textbind_lora_config = config  # type: ignore[attr-defined]  # for save_adapter
    return adapted


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_layer(module) for module in model.modules())


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every adapter merged into its base weight, under the plain model's key names.

    `W + scale * B @ A` comes from PEFT's own `get_delta_weight`; the model itself is not changed, so
    training (or a resume) can go on after an export.
    """
    state = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        prefix = f"{name}." if name else ""
        base = module.get_base_layer()
        with torch.no_grad():
            merged[f"{prefix}weight"] = base.weight.detach() + module.get_delta_weight(ADAPTER_NAME).to(base.weight)
        bias = getattr(base, "bias", None)
        if bias is not None:
            merged[f"{prefix}bias"] = bias.detach()
    for key, value in state.items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        merged.setdefault(plain, value)
    return merged


def adapter_state_dict(language_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, with PEFT's saved key names (`base_model.model.<module>.lora_A.weight`)."""
    return {
        f"base_model.model.{key.replace(f'.{ADAPTER_NAME}.', '.')}": value.detach().cpu().contiguous()
        for key, value in language_model.state_dict().items() if "lora_" in key
    }
