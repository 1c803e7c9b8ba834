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
# Conversation markups: Llama-2 chat as TextBind trained it, or the language model tokenizer's own chat template.
TEMPLATES = ("llama2", "chat_template")

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

    # A transformers Blip2ForConditionalGeneration directory or hub id (what `textbind export` writes): when set,
    # the vision model, Q-Former, projector, language model, tokenizer and processor all come from it.
    pretrained: str | None = None  # Blip2 directory or hub id; when set, the part paths below are not used
    vision_model: str | None = None  # Blip2VisionModel directory or hub id
    qformer: str | None = None  # query tokens + Q-Former weights (.safetensors, or a legacy .pt state dict)
    language_model: str | None = None  # Llama directory or hub id (weights + tokenizer)
    processor: str | None = None  # BLIP-2 processor / image processor directory or hub id
    qformer_num_heads: int | None = None  # legacy Q-Former files without a config only; null: hidden size / 64
    checkpoint: str | None = None  # trained modules to load over the parts (our export, or second_stage_model.pt)
    num_query_tokens: int | None = None  # null: as the Q-Former file holds; set: checked against it
    template: str = "llama2"  # conversation markup: llama2 (Llama-2 chat) | chat_template (the tokenizer's own)
    trainable: list[str] = field(default_factory=lambda: ["query_tokens", "qformer", "qformer_projection"])
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the model is built in
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention (GPU); flash_attention_2 refuses branch masks
    gradient_checkpointing: bool = False  # recompute the language model's activations in backward (memory)
    quantize: str | None = None  # 4bit | 8bit: load the language model quantized for inference (CUDA + bitsandbytes)

    def validate(self) -> None:
        unknown = [name for name in self.trainable if name not in MODULE_NAMES]
        if unknown:
            raise ConfigError(f"model.trainable: unknown module(s) {unknown}; choose from {list(MODULE_NAMES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.num_query_tokens is not None and self.num_query_tokens <= 0:
            raise ConfigError("model.num_query_tokens must be positive (or null: as the Q-Former file holds)")
        if self.quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"model.quantize must be 4bit, 8bit or null, got {self.quantize!r}")
        if self.qformer_num_heads is not None and self.qformer_num_heads <= 0:
            raise ConfigError("model.qformer_num_heads must be positive (or null)")
        if self.template not in TEMPLATES:
            raise ConfigError(f"model.template must be one of {list(TEMPLATES)}, got {self.template!r}")
        if self.attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise ConfigError(f"model.attn_implementation must be sdpa, eager or flex_attention, "
                              f"got {self.attn_implementation!r}")


@dataclass
class DataConfig:
    """Training data and how it becomes token sequences."""

    stage: int = 1  # 1: webdataset image-caption shards; 2: conversation JSON
    train_path: str = ""  # stage 1: brace pattern of tars; stage 2: JSON file(s), comma separated
    train_weights: list[float] = field(default_factory=list)  # stage 2 mixture weights, one per JSON file
    val_path: str | None = None  # held-out data for textbind validate (same formats as train_path)
    image_dir: str = ""  # global image dir for stage-2 records without their own image_dir
    max_input_length: int = 256  # tokens of the main sequence; longer ones are cut (never inside an image)
    samples_per_epoch: int | None = None  # an epoch is this many samples (null: one pass over the data)
    num_workers: int = 2  # data-loader worker processes per rank (0: load in the training process)
    on_bad_record: str = "skip"  # skip | error
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
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError("data.samples_per_epoch must be positive (or null: one pass over the data)")


@dataclass
class OptimConfig:
    """Optimiser and schedule (Adam, cosine with warmup)."""

    lr: float = 1e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # Adam's
    eps: float = 1e-8  # Adam's
    weight_decay: float = 0.001
    warmup_steps: int = 2000  # linear warmup, then a cosine decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.0  # the cosine's floor as a share of lr
    gradient_clipping: float = 1.0  # max global gradient norm
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # per top-level module, e.g. {vision_model: 3}

    def validate(self) -> None:
        unknown = [name for name in self.lr_multipliers if name not in MODULE_NAMES]
        if unknown:
            raise ConfigError(f"optim.lr_multipliers: unknown module(s) {unknown}; choose from {list(MODULE_NAMES)}")


@dataclass
class LoraConfig:
    """Low-rank adapters on the language model (PEFT); the Q-Former and projector still train fully."""

    enabled: bool = False  # the language model trains through adapters only (whatever model.trainable says)
    rank: int = 16  # r of each adapter
    alpha: float = 32.0  # scaling = alpha / rank
    dropout: float = 0.05
    target_modules: list[str] = field(  # the language model's linear layers that get an adapter
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    save_adapter: bool = False  # also write the adapter alone (PEFT layout) beside the merged export

    def validate(self) -> None:
        if self.enabled and (self.rank < 1 or not self.target_modules):
            raise ConfigError("train.lora: rank must be positive and target_modules not empty")


@dataclass
class TrainConfig:
    """Batching, length, checkpointing and logging of one run."""

    output_dir: str = "runs/default"  # checkpoints, metrics, TensorBoard and the export go here
    export_name: str = "model"  # the trained modules are exported to output_dir/export_name at the end
    epochs: int = 1  # passes over samples_per_epoch samples
    max_steps: int | None = None  # optimizer steps; null: derived from epochs
    micro_batch_size: int = 1  # samples per forward on each rank
    global_batch_size: int = 1  # = micro_batch_size x gradient_accumulation x world size
    seed: int = 42  # data order, initialisation, dropout
    deepspeed_config: str | None = None  # engine JSON (ZeRO stage, precision, offload); null: ZeRO-2 defaults
    zero_stage: int | None = None  # null: as the engine JSON says
    precision: str | None = None  # null: as the engine JSON says | bf16 | fp16 | fp32
    save_every: int = 1000  # steps between resumable checkpoints; 0: only at the end
    keep_last: int = 2  # resumable checkpoints kept
    resume: str = "auto"  # auto | never | <path to a resumable checkpoint>
    log_every: int = 10  # steps between log lines (metrics.jsonl gets every step)
    tensorboard: bool = True  # TensorBoard events in output_dir/tensorboard
    record_samples: bool = False  # write output_dir/samples/rank{R}.jsonl: which samples each step saw
    wandb_project: str | None = None  # Weights & Biases project (with WANDB_API_KEY set); null: off
    lora: LoraConfig = field(default_factory=LoraConfig)  # train.lora.*: adapters instead of full fine-tuning
    quantize: str | None = None  # 4bit | 8bit: load the frozen language model quantized (QLoRA; CUDA + bitsandbytes)

    def validate(self) -> None:
        for name in ("epochs", "micro_batch_size", "global_batch_size", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every must be 0 or more, got {self.save_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be positive (or null: derived from epochs), got {self.max_steps}")
        self.lora.validate()
        if self.quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"train.quantize must be 4bit, 8bit or null, got {self.quantize!r}")
        if self.quantize and not self.lora.enabled:
            raise ConfigError("train.quantize needs train.lora.enabled=true: a quantized model trains through adapters")
        if self.precision not in (None, "bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be bf16, fp16, fp32 or null, got {self.precision!r}")
        if self.deepspeed_config:
            from textbind.resources import resolve_resource

            # a shipped engine JSON (configs/deepspeed/...) is found from any working directory
            self.deepspeed_config = resolve_resource(self.deepspeed_config)


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
        # Unset: YAML null, or from a command line or script variable "", "none" or "null".
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
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
    from textbind.resources import resolve_resource

    config = config_type()
    if path:
        # configs/... names a shipped config from any working directory, in a checkout and in an installed wheel
        for values in _read_yaml_chain(Path(resolve_resource(str(path)))):
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

    def comments_of(cls: type) -> dict[str, str]:
        found = {}
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if match:
                found[match.group(1)] = match.group(2)
        return found

    def describe(section: Any, prefix: str, lines: list[str]) -> None:
        comments = comments_of(type(section))
        for item in dataclasses.fields(section):
            default = getattr(section, item.name)
            if dataclasses.is_dataclass(default):
                describe(default, f"{prefix}{item.name}.", lines)
                continue
            shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                                   default_flow_style=True).strip().removesuffix("...").strip()
            meaning = comments.get(item.name, "")
            lines.append(f"  {prefix}{item.name} = {shown}" + (f"    # {meaning}" if meaning else ""))

    lines: list[str] = []
    root = config_type()
    for section in dataclasses.fields(root):
        value = getattr(root, section.name)
        doc = (type(value).__doc__ or "").strip().splitlines()
        lines.append(f"{section.name}:  {doc[0] if doc else ''}")
        describe(value, f"{section.name}.", lines)
    return "\n".join(lines)
