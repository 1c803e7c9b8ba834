"""Typed run configuration: dataclasses, YAML loading, key=value overrides, validation."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODULE_NAMES = ("vision_model", "query_tokens", "qformer", "qformer_projection", "language_model")

# Every spelling of a dtype the configs and flags accept -> its canonical torch name.
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def torch_dtype(name: str) -> Any:
    """A dtype name of DTYPE_NAMES (any case) -> the torch dtype; ConfigError for anything else."""
    import torch

    canonical = DTYPE_NAMES.get(str(name).lower())
    if canonical is None:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, canonical)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class ModelConfig:
    """Where the pretrained parts come from and which parts train."""

    vision_model: str = ""  # Blip2VisionModel directory
    qformer: str = ""  # query tokens + Q-Former weights (.safetensors, or a legacy .pt state dict)
    language_model: str = ""  # Llama directory (weights + tokenizer)
    processor: str = ""  # BLIP-2 processor / image processor directory
    qformer_num_heads: int = 0  # only for legacy Q-Former files without a config; 0: hidden size / 64 (BLIP-2)
    checkpoint: str = ""  # trained modules to load over the above (our export dir/file, or second_stage_model.pt)
    num_query_tokens: int = 32
    trainable: list[str] = field(default_factory=lambda: ["query_tokens", "qformer", "qformer_projection"])
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the model is built in
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention (BlockMask for branches/packing; GPU)
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        unknown = [name for name in self.trainable if name not in MODULE_NAMES]
        if unknown:
            raise ConfigError(f"model.trainable: unknown module(s) {unknown}; choose from {list(MODULE_NAMES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.num_query_tokens <= 0:
            raise ConfigError("model.num_query_tokens must be positive")
        if self.attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise ConfigError(f"model.attn_implementation must be sdpa, eager or flex_attention, "
                              f"got {self.attn_implementation!r}")


@dataclass
class DataConfig:
    """Training data and how it becomes token sequences."""

    stage: int = 1  # 1: webdataset image-caption shards; 2: conversation JSON
    train_path: str = ""  # stage 1: brace pattern of tars; stage 2: JSON file(s), comma separated
    train_weights: list[float] = field(default_factory=list)  # stage 2 mixture weights, one per JSON file
    val_path: str = ""
    image_dir: str = ""  # global image dir for stage-2 records without their own image_dir
    max_input_length: int = 256
    samples_per_epoch: int = 0  # stage 1: an epoch is this many samples (0: one pass over the data)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    on_bad_record: str = "skip"  # skip | error
    system_prompt: str = ""
    # A micro-batch keeps micro_batch_size samples, laid out in as few rows as first-fit needs, balanced;
    # a sample longer than a row is truncated to fit (see textbind/data/packing.py).
    pack_length: int = 0  # tokens per packed row; 0: off (one right-padded row per sample)

    def validate(self) -> None:
        if self.pack_length and self.pack_length < 8:
            raise ConfigError(f"data.pack_length must be 0 (off) or at least 8, got {self.pack_length}")
        if self.stage not in (1, 2):
            raise ConfigError(f"data.stage must be 1 or 2, got {self.stage}")
        if self.on_bad_record not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_record must be 'skip' or 'error', got {self.on_bad_record!r}")
        if self.max_input_length < 8:
            raise ConfigError("data.max_input_length must be at least 8")


@dataclass
class OptimConfig:
    """Optimiser and schedule (Adam, cosine with warmup)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.001
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0
    gradient_clipping: float = 1.0
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # per top-level module, e.g. {vision_model: 3}

    def validate(self) -> None:
        unknown = [name for name in self.lr_multipliers if name not in MODULE_NAMES]
        if unknown:
            raise ConfigError(f"optim.lr_multipliers: unknown module(s) {unknown}; choose from {list(MODULE_NAMES)}")


@dataclass
class TrainConfig:
    """Batching, length, checkpointing and logging of one run."""

    output_dir: str = "runs/default"
    export_name: str = "model"  # the trained modules are exported to output_dir/export_name at the end
    epochs: int = 1
    max_steps: int = 0  # 0: derived from epochs
    micro_batch_size: int = 1
    global_batch_size: int = 1  # = micro_batch_size x gradient_accumulation x world size
    seed: int = 42
    deepspeed_config: str = ""  # engine JSON (ZeRO stage, precision, offload)
    zero_stage: int = -1  # -1: as the engine JSON says
    precision: str = ""  # "" (engine JSON) | bf16 | fp16 | fp32
    save_every: int = 1000  # steps between resumable checkpoints; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <path to a resumable checkpoint>
    log_every: int = 10
    tensorboard: bool = True
    record_samples: bool = False  # write output_dir/samples/rank{R}.jsonl: which samples each step saw
    wandb_project: str = ""

    def validate(self) -> None:
        for name in ("epochs", "micro_batch_size", "global_batch_size", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more, got {getattr(self, name)}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        return self


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], where)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(annotation)
        return {str(key): _coerce(item, value_type, f"{where}.{key}") for key, item in value.items()}
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(item, item_type, where) for item in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected a boolean, got {value!r}")
        return bool(value)
    if annotation in (int, float):
        try:
            converted = annotation(value) if not isinstance(value, str) else annotation(float(value))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from error
        if annotation is int and isinstance(value, (float, str)) and float(value) != converted:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return converted
    if annotation is str:
        return "" if value is None else str(value)
    return value


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}; known: {sorted(names)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} must be a mapping")
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{prefix}{key}"))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "model.trainable=[qformer]"] into a nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = nested
        *parents, leaf = key.lstrip("-").split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                config_type: type = RunConfig) -> Any:
    """Load a YAML config (which may `include:` other YAML files), then apply key=value overrides.

    `config_type` is a dataclass of section dataclasses (RunConfig by default; the data engine has its
    own) with a `validate()` method that returns the config.
    """
    config = config_type()
    if path:
        for values in _read_yaml_chain(Path(path)):
            _apply(config, values, "")
    if overrides:
        _apply(config, parse_overrides(overrides), "")
    return config.validate()


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config include cycle at {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    chain: list[dict[str, Any]] = []
    for include in values.pop("include", []) or []:
        chain += _read_yaml_chain(path.parent / include, seen + (path.resolve(),))
    return chain + [values]


def config_to_dict(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        return value

    return {
        section.name: {key: plain(value) for key, value in dataclasses.asdict(getattr(config, section.name)).items()}
        for section in dataclasses.fields(config)
    }


def save_config(config: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def config_help(config_type: type = RunConfig) -> str:
    """Every key of a config dataclass with its default and meaning (the comment beside its field), for --help."""
    import inspect
    import re

    lines = []
    root = config_type()
    for section in dataclasses.fields(root):
        value = getattr(root, section.name)
        cls = type(value)
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if match:
                comments[match.group(1)] = match.group(2)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{section.name}:  {doc}")
        for item in dataclasses.fields(value):
            default = getattr(value, item.name)
            shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                                   default_flow_style=True).strip().removesuffix("...").strip()
            meaning = comments.get(item.name, "")
            lines.append(f"  {section.name}.{item.name} = {shown}" + (f"    # {meaning}" if meaning else ""))
    return "\n".join(lines)
