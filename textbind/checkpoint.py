"""Exported weights: trained modules as safetensors (+ resolved config), and the original release's .pt."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from textbind.config import MODULE_NAMES, RunConfig, save_config
from textbind.model.builder import load_torch_state_dict
from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
INFO_NAME = "textbind.json"


@dataclass
class LoadReport:
    """Which keys of a checkpoint were used, and which the model expected but did not get."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the checkpoint's modules, absent from the file
    unexpected: list[str] = field(default_factory=list)  # in the file, unknown to the model

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected"
            + (f" (missing e.g. {self.missing[:3]})" if self.missing else "")
            + (f" (unexpected e.g. {self.unexpected[:3]})" if self.unexpected else "")
        )


def trained_state_dict(model: MIMModel, module_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the named top-level modules (default: those that train), keys as in the release."""
    names = module_names if module_names is not None else model.trainable_module_names()
    state = {}
    seen_storage: set[int] = set()
    for key, value in model.state_dict().items():
        if key.split(".")[0] not in names:
            continue
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied embeddings): store a copy of the second.
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storage:
            tensor = tensor.clone()
        seen_storage.add(pointer)
        state[key] = tensor
    return state


def save_trained_modules(
    model: MIMModel,
    output_dir: str | os.PathLike,
    config: RunConfig | None = None,
    module_names: list[str] | None = None,
    extra_info: dict | None = None,
) -> Path:
    """Write `model.safetensors` (+ `config.yaml`, `textbind.json`) into `output_dir`, atomically."""
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = trained_state_dict(model, module_names)
    modules = sorted({key.split(".")[0] for key in state})
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_file(state, str(temporary / WEIGHTS_NAME), metadata={"modules": ",".join(modules)})
        if config is not None:
            save_config(config, temporary / CONFIG_NAME)
        info = {"modules": modules, "num_tensors": len(state), **(extra_info or {})}
        (temporary / INFO_NAME).write_text(json.dumps(info, indent=2))
        if output.exists():
            previous = output.with_name(f".{output.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            output.rename(previous)
            temporary.rename(output)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            temporary.rename(output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return output


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an exported directory, a .safetensors file, or an original-release .pt/.bin file."""
    source = Path(path)
    if source.is_dir():
        source = source / WEIGHTS_NAME
    if not source.exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    if source.suffix == ".safetensors":
        return load_file(str(source))
    return load_torch_state_dict(source)


def load_trained_modules(model: MIMModel, path: str | os.PathLike) -> LoadReport:
    """Load a checkpoint non-strictly over `model` and report what matched.

    Only the top-level modules that the file mentions are checked for missing keys, as the
    original release holds the trained modules only.
    """
    state = read_checkpoint_tensors(path)
    report = LoadReport(source=str(path))
    model_state = model.state_dict()
    present_modules = {key.split(".")[0] for key in state}
    usable = {}
    for key, tensor in state.items():
        if key not in model_state or key.split(".")[0] not in MODULE_NAMES:
            report.unexpected.append(key)
            continue
        expected = model_state[key].shape
        if tensor.shape != expected:
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected)}"
                + (" (was the tokenizer built with the same special tokens?)" if "embed" in key or "lm_head" in key
                   else "")
            )
        usable[key] = tensor
    report.loaded = sorted(usable)
    tied = _tied_keys(model)
    report.missing = sorted(
        key for key in model_state if key.split(".")[0] in present_modules and key not in usable and key not in tied
    )
    model.load_state_dict(usable, strict=False)
    logger.info(report.summary())
    return report


def _tied_keys(model: MIMModel) -> set[str]:
    """Keys whose tensor is shared with another key (loading one loads both)."""
    by_pointer: dict[int, list[str]] = {}
    for key, value in model.state_dict().items():
        by_pointer.setdefault(value.untyped_storage().data_ptr(), []).append(key)
    return {key for keys in by_pointer.values() if len(keys) > 1 for key in keys[1:]}
