"""Builders: assemble a MIMModel from local pretrained parts, tokenizer and image processor."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionModel,
    PreTrainedTokenizerBase,
)

from textbind import IMAGE_TOKEN, SPECIAL_TOKENS
from textbind.config import ModelConfig
from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelBundle:
    """Everything needed to turn conversations into model inputs and run the model."""

    model: MIMModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any


def _require(path: str, what: str) -> Path:
    if not path:
        raise FileNotFoundError(f"model.{what} is not set: give the local path of the {what}")
    resolved = Path(path)
    if not resolved.exists():
        raise FileNotFoundError(f"model.{what}: {path} does not exist")
    return resolved


def load_tokenizer(language_model_path: str) -> PreTrainedTokenizerBase:
    """The language model's tokenizer with `<image>`, `<start>`, `<end>` added as special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(language_model_path, local_files_only=True)
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


def load_torch_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict of tensors, refusing any pickled object that is not a tensor."""
    try:
        state_dict = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's errors have many types
        raise ValueError(f"{file}: not a plain tensor state dict ({error})") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{file}: expected a dict of tensors")
    return state_dict


def infer_qformer_config(state_dict: dict[str, torch.Tensor], num_heads: int = 0) -> Blip2QFormerConfig:
    """Recover a Q-Former config from its weights (for legacy files that carry no config).

    The head count is not in the weights: 0 means BLIP-2's head size of 64."""
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


def load_qformer(path: str, num_heads: int = 0) -> tuple[Blip2QFormerModel, torch.Tensor]:
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


def build_model(config: ModelConfig, *, load_checkpoint: bool = True) -> ModelBundle:
    """Assemble the model from the local paths in `config`, load trained modules, choose what trains."""
    # imported here: it registers the flex dispatcher with transformers and needs the data layer's mask rule
    from textbind.model.attention import language_model_attention

    dtype = DTYPES[config.dtype]
    tokenizer = load_tokenizer(str(_require(config.language_model, "language_model")))
    image_processor = AutoImageProcessor.from_pretrained(
        str(_require(config.processor, "processor")), local_files_only=True
    )
    vision_model = Blip2VisionModel.from_pretrained(
        str(_require(config.vision_model, "vision_model")), dtype=dtype, local_files_only=True
    )
    qformer, query_tokens = load_qformer(config.qformer, config.qformer_num_heads)
    language_model = AutoModelForCausalLM.from_pretrained(
        config.language_model, dtype=dtype, attn_implementation=language_model_attention(config.attn_implementation),
        local_files_only=True,
    )
    resize_embeddings_for_special_tokens(language_model, len(tokenizer))
    model = MIMModel(
        vision_model=vision_model,
        qformer=qformer,
        query_tokens=query_tokens,
        language_model=language_model,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    ).to(dtype)
    if load_checkpoint and config.checkpoint:
        from textbind.checkpoint import load_trained_modules

        load_trained_modules(model, config.checkpoint)
    model.set_trainable(config.trainable)
    if config.gradient_checkpointing:
        # transformers renamed the switch (5.2x); prefer the new name where it exists.
        if hasattr(language_model, "activation_checkpointing_enable"):
            language_model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ModelBundle(model=model, tokenizer=tokenizer, image_processor=image_processor)
