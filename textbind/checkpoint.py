"""Checkpointing in one place: resumable run state, exported weights (safetensors), the original release's .pt.

Resumable state (`save_resumable` / `load_resumable`): DeepSpeed's model, optimizer and scheduler
state plus each rank's step, data position and RNG state, under `OUTPUT_DIR/checkpoints/stepNNNNNNNN`,
with an atomic `latest` pointer and the last `keep_last` checkpoints kept. Exports
(`save_trained_modules`): the trained modules as `model.safetensors` with the resolved config.
Imports (`load_trained_modules`): our exports or the released `second_stage_model.pt`, read as plain
tensors (`weights_only=True`), with a report of missing and unexpected keys.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from textbind.config import MODULE_NAMES, RunConfig, save_config
from textbind.io import atomic_write_text

if TYPE_CHECKING:  # the model package imports this module (its builder loads checkpoints)
    from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
INFO_NAME = "textbind.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
ADAPTER_DIR = "adapter"  # the LoRA adapters alone, beside a merged export (train.lora.save_adapter)


# --- Resumable run state ------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path | None:
    latest = output_dir / CHECKPOINTS_DIR / LATEST_FILE
    if not latest.is_file():
        return None
    tag_dir = output_dir / CHECKPOINTS_DIR / latest.read_text().strip()
    return tag_dir if tag_dir.is_dir() else None


def resolve_resume(mode: str, output_dir: Path) -> Path | None:
    """`train.resume`: auto (the latest checkpoint of output_dir, if any), never, or a checkpoint path."""
    if mode == "never":
        return None
    if mode == "auto":
        return latest_checkpoint(output_dir)
    path = Path(mode)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resumable(engine: Any, output_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> None:
    """DeepSpeed's state + this rank's `trainer_state` (with the RNG added) as checkpoint `step`.

    `latest` is rewritten atomically only after every rank has written everything, so a run killed
    mid-save resumes from the previous checkpoint; older checkpoints are pruned after that.
    """
    import torch.distributed as dist

    checkpoints = output_dir / CHECKPOINTS_DIR
    tag = f"step{step:08d}"
    tag_dir = checkpoints / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    torch.save({"step": step, **trainer_state, "rng": rng_state()}, tag_dir / f"trainer_state_rank{rank}.pt")
    engine.save_checkpoint(str(checkpoints), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        atomic_write_text(checkpoints / LATEST_FILE, tag)
        tags = sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_resumable(engine: Any, tag_dir: Path) -> dict[str, Any]:
    """Restore DeepSpeed's state and return this rank's trainer state (RNG restored too)."""
    import torch.distributed as dist

    load_path, _ = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    state_file = tag_dir / f"trainer_state_rank{dist.get_rank()}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: was the run resumed with another world size?")
    state = torch.load(state_file, weights_only=True)
    set_rng_state(state["rng"])
    return state


def export_trained(engine: Any, module: MIMModel, path: Path, config: RunConfig, extra_info: dict[str, Any]) -> None:
    """Write the trained modules (safetensors + resolved config) on rank 0; gathers ZeRO-3 partitions first."""
    import torch.distributed as dist

    names = module.trainable_module_names()
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # on rank 0 only
        if dist.get_rank() == 0:
            state = {k: v for k, v in full.items() if k.split(".")[0] in names}
            module.load_state_dict(state, strict=False)
    if dist.get_rank() == 0:
        save_trained_modules(module, path, config, names, extra_info=extra_info)
    dist.barrier()


# --- Exports and imports ------------------------------------------------------------------------------------


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
    from textbind.model.lora import has_lora, merged_state_dict

    names = module_names if module_names is not None else model.trainable_module_names()
    state = {}
    seen_storage: set[int] = set()
    # Adapters are merged into their base weights: an export loads into a plain model, LoRA or not.
    full_state = merged_state_dict(model) if has_lora(model.language_model) else model.state_dict()
    for key, value in full_state.items():
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
        if config is not None and config.train.lora.save_adapter:
            _save_adapter(model, temporary / ADAPTER_DIR)
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


def load_torch_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict of tensors, refusing any pickled object that is not a tensor."""
    try:
        state_dict = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's errors have many types
        raise ValueError(f"{file}: not a plain tensor state dict ({error})") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return state_dict


def _save_adapter(model: MIMModel, directory: Path) -> None:
    """The language model's LoRA adapters alone, as PEFT saves them (adapter_model.safetensors + its config)."""
    from textbind.model.lora import adapter_state_dict

    language_model = model.language_model
    lora_config = getattr(language_model, "textbind_lora_config", None)
    if lora_config is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(language_model), str(directory / "adapter_model.safetensors"))
    lora_config.base_model_name_or_path = getattr(language_model.config, "_name_or_path", None)
    lora_config.save_pretrained(str(directory))


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
