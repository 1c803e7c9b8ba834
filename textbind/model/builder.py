"""Builders: assemble a MIMModel from pretrained parts (or one Blip2 directory), tokenizer and image processor."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionModel,
    PreTrainedTokenizerBase,
)

from textbind import IMAGE_TOKEN, SPECIAL_TOKENS
from textbind.checkpoint import load_torch_state_dict, load_trained_modules
from textbind.config import ConfigError, ModelConfig, torch_dtype
from textbind.model.lora import add_lora
from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

@dataclass
class ModelBundle:
    """Everything needed to turn conversations into model inputs and run the model."""

    model: MIMModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any


def _require(path: str, what: str) -> Path:
    """A local file or directory that must exist (the Q-Former file: no hub id can stand for it)."""
    if not path:
        raise FileNotFoundError(f"model.{what} is not set: give the local path of the {what}")
    resolved = Path(path)
    if not resolved.exists():
        raise FileNotFoundError(f"model.{what}: {path} does not exist")
    return resolved


# `owner/name` as the hub spells repository ids. A bare name is not taken for one: it is far more often a
# mistyped local directory, which should fail as "does not exist" rather than as a hub lookup.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """True when `path` does not exist locally and is shaped like a hub repository id (`owner/name`)."""
    return (
        not Path(path).exists()
        and _HUB_ID.fullmatch(path) is not None
        and not path.endswith((".safetensors", ".pt", ".bin", ".json", ".yaml"))
    )


def resolve_source(path: str | None, what: str) -> str:
    """A local path that exists or a hub id, for `from_pretrained`; FileNotFoundError names the config key."""
    if not path:
        raise FileNotFoundError(f"model.{what} is not set: give a local path or a hub id of the {what}")
    if Path(path).exists() or is_hub_id(path):
        return path
    raise FileNotFoundError(f"model.{what}: {path} does not exist")


def from_pretrained(loader: Any, path: str | None, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` on a local path or hub id (resolved as transformers does, HF_HUB_OFFLINE included).

    A local path never reaches the network; a hub id that cannot be loaded is a FileNotFoundError naming
    the config key, like a missing local path."""
    source = resolve_source(path, what)
    if not is_hub_id(source):
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"model.{what}: {source} is no local path, and loading it as a hub id failed: {error}"
        ) from error


def load_tokenizer(language_model_path: str, what: str = "language_model") -> PreTrainedTokenizerBase:
    """The language model's tokenizer (local path or hub id) with `<image>`, `<start>`, `<end>` as special tokens."""
    tokenizer = from_pretrained(AutoTokenizer, language_model_path, what)
    missing = [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    if tokenizer.pad_token_id is None:
        # Llama-2 has no pad token; padded positions are masked and never supervised.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_qformer_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Query tokens + Q-Former weights and, when the file records it, the Q-Former config.

    `.safetensors` files are what `textbind.prepare_blip2` writes (config in the metadata);
    `.pt`/`.bin` files are legacy `torch.save`d state dicts, read with `weights_only=True`.
    """
    file = _require(path, "qformer")
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        config = json.loads(metadata["qformer_config"]) if "qformer_config" in metadata else None
        return state_dict, config
    return load_torch_state_dict(file), None


def infer_qformer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> Blip2QFormerConfig:
    """Recover a Q-Former config from its weights (for legacy files that carry no config).

    The head count is not in the weights: None means BLIP-2's head size of 64."""
    hidden_size = state_dict["qformer.layernorm.weight"].shape[0]
    layer_indices = {int(key.split(".")[3]) for key in state_dict if key.startswith("qformer.encoder.layer.")}
    cross_layers = sorted(
        {int(key.split(".")[3]) for key in state_dict if ".crossattention." in key and key.startswith("qformer.")}
    )
    frequency = cross_layers[1] - cross_layers[0] if len(cross_layers) > 1 else 1
    return Blip2QFormerConfig(
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_indices),
        num_attention_heads=num_heads or max(1, hidden_size // 64),
        intermediate_size=state_dict["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        encoder_hidden_size=state_dict["qformer.encoder.layer.0.crossattention.attention.key.weight"].shape[1],
        cross_attention_frequency=frequency,
    )


def resize_embeddings_for_special_tokens(language_model: torch.nn.Module, vocab_size: int) -> None:
    """Grow the embeddings to the tokenizer; new rows get the mean of the old ones (deterministic)."""
    old_size = language_model.get_input_embeddings().weight.shape[0]
    if vocab_size == old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if vocab_size > old_size:
        with torch.no_grad():
            for embedding in (language_model.get_input_embeddings(), language_model.get_output_embeddings()):
                if embedding is not None:
                    embedding.weight[old_size:] = embedding.weight[:old_size].mean(dim=0, keepdim=True)


def load_qformer(path: str, num_heads: int | None = None) -> tuple[Blip2QFormerModel, torch.Tensor]:
    """The Q-Former and its (1, Q, D) query tokens from a `blip2_qformer` file (see load_qformer_weights)."""
    state_dict, qformer_config = load_qformer_weights(path)
    if qformer_config is not None:
        qformer = Blip2QFormerModel(Blip2QFormerConfig.from_dict(qformer_config))
    else:
        qformer = Blip2QFormerModel(infer_qformer_config(state_dict, num_heads))
    prefixed = {key[len("qformer.") :]: value for key, value in state_dict.items() if key.startswith("qformer.")}
    result = qformer.load_state_dict(prefixed, strict=False)
    if result.missing_keys:
        raise ValueError(f"{path}: Q-Former weights are missing {result.missing_keys[:5]}...")
    if "query_tokens" not in state_dict:
        raise ValueError(f"{path}: no 'query_tokens' tensor")
    return qformer, state_dict["query_tokens"]


def quantization_config(mode: str | None, compute_dtype: torch.dtype, where: str) -> Any:
    """bitsandbytes settings for `4bit` (NF4, double quantization: QLoRA's) or `8bit`; None when off."""
    if mode is None:
        return None
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}={mode} needs a CUDA GPU (bitsandbytes quantizes on the GPU); this machine has none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"{where}={mode} needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


@dataclass
class _Parts:
    """The pretrained pieces a MIMModel is assembled from."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    vision_model: torch.nn.Module
    qformer: torch.nn.Module
    query_tokens: torch.Tensor  # (1, Q, Dq)
    language_model: torch.nn.Module
    projection: torch.nn.Linear | None = None  # a Blip2 directory's trained `language_projection`


def _load_separate_parts(config: ModelConfig, dtype: torch.dtype, bits: Any) -> _Parts:
    # imported here: it registers the flex dispatcher with transformers and needs the data layer's mask rule
    from textbind.model.attention import language_model_attention

    tokenizer = load_tokenizer(config.language_model)
    image_processor = from_pretrained(AutoImageProcessor, config.processor, "processor")
    vision_model = from_pretrained(Blip2VisionModel, config.vision_model, "vision_model", dtype=dtype)
    qformer, query_tokens = load_qformer(config.qformer, config.qformer_num_heads)
    quantized = {} if bits is None else {"quantization_config": bits, "device_map": {"": torch.cuda.current_device()}}
    language_model = from_pretrained(
        AutoModelForCausalLM, config.language_model, "language_model",
        dtype=dtype, attn_implementation=language_model_attention(config.attn_implementation), **quantized,
    )
    return _Parts(tokenizer, image_processor, vision_model, qformer, query_tokens, language_model)


def _load_blip2_parts(config: ModelConfig, dtype: torch.dtype, bits: Any) -> _Parts:
    """The parts of a transformers `Blip2ForConditionalGeneration` (our export, or any BLIP-2 with a causal LM)."""
    from textbind.model.attention import language_model_attention

    if bits is not None:
        raise ConfigError("quantized loading (model.quantize / train.quantize) does not take model.pretrained yet: "
                          "give the parts' paths instead")
    tokenizer = load_tokenizer(config.pretrained, "pretrained")
    image_processor = from_pretrained(AutoImageProcessor, config.pretrained, "pretrained")
    blip2 = from_pretrained(Blip2ForConditionalGeneration, config.pretrained, "pretrained", dtype=dtype)
    if not blip2.config.use_decoder_only_language_model:
        raise ValueError(
            f"model.pretrained: {config.pretrained} holds an encoder-decoder language model "
            f"({blip2.config.text_config.model_type}); textbind needs a decoder-only one"
        )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if blip2.config.image_token_id is not None and blip2.config.image_token_id != image_token_id:
        raise ValueError(
            f"model.pretrained: {config.pretrained}: config.json's image_token_id {blip2.config.image_token_id} "
            f"is not the tokenizer's {IMAGE_TOKEN} ({image_token_id})"
        )
    language_model = blip2.language_model
    language_model.set_attn_implementation(language_model_attention(config.attn_implementation))
    return _Parts(
        tokenizer, image_processor, blip2.vision_model, blip2.qformer, blip2.query_tokens.data, language_model,
        projection=blip2.language_projection,
    )


def build_model(config: ModelConfig, *, load_checkpoint: bool = True, lora: Any = None,
                quantize: str | None = None) -> ModelBundle:
    """Assemble the model from `config` (one Blip2 directory, or the separate parts; local paths or hub ids),
    load trained modules, choose what trains.

    `lora` (a `textbind.config.LoraConfig`, enabled) adds adapters to the language model, which then
    trains through them only; `quantize` (or `config.quantize`) loads the language model in 4 or 8 bits.
    """
    dtype = torch_dtype(config.dtype)
    quantize = quantize or config.quantize
    where = "train.quantize" if quantize and quantize != config.quantize else "model.quantize"
    bits = quantization_config(quantize, dtype, where)
    load_parts = _load_blip2_parts if config.pretrained else _load_separate_parts
    parts = load_parts(config, dtype, bits)
    tokenizer, language_model, query_tokens = parts.tokenizer, parts.language_model, parts.query_tokens
    source = config.pretrained or config.qformer
    if config.num_query_tokens is not None and config.num_query_tokens != query_tokens.shape[1]:
        raise ConfigError(
            f"model.num_query_tokens is {config.num_query_tokens} but {source} holds "
            f"{query_tokens.shape[1]} query tokens: fix the config or leave the key unset (null)"
        )
    if config.template == "chat_template" and not tokenizer.chat_template:
        raise ValueError("model.template=chat_template: the language model's tokenizer has no chat template")
    # Every ConversationEncoder built on this tokenizer (training, validation, generation) reads the markup here
    # (textbind.data.sequence.TEMPLATE_ATTRIBUTE).
    tokenizer.textbind_template = config.template
    resize_embeddings_for_special_tokens(language_model, len(tokenizer))
    model = MIMModel(
        vision_model=parts.vision_model,
        qformer=parts.qformer,
        query_tokens=query_tokens,
        language_model=language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    if parts.projection is not None:
        model.qformer_projection.load_state_dict(parts.projection.state_dict())
    if bits is None:
        # One dtype for every part: a Blip2 directory loads its Q-Former in float32 (`_keep_in_fp32_modules`).
        model.to(dtype)
    else:  # quantized weights keep their storage; the other parts go to the dtype and the LLM's device
        for part in (model.vision_model, model.qformer, model.qformer_projection):
            part.to(device=language_model.device, dtype=dtype)
        model.query_tokens.data = model.query_tokens.data.to(device=language_model.device, dtype=dtype)
    if load_checkpoint and config.checkpoint:
        load_trained_modules(model, config.checkpoint)
    model.set_trainable(config.trainable)
    if lora is not None and lora.enabled:
        if bits is not None:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(language_model, use_gradient_checkpointing=config.gradient_checkpointing)
        adapted = add_lora(language_model, lora)
        logger.info("LoRA rank %d on %d layers of the language model", lora.rank, len(adapted))
    if config.gradient_checkpointing:
        # transformers renamed the switch (5.2x); prefer the new name where it exists.
        if hasattr(language_model, "activation_checkpointing_enable"):
            language_model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ModelBundle(model=model, tokenizer=tokenizer, image_processor=parts.image_processor)
