"""The MIM model: BLIP-2 vision encoder -> Q-Former -> linear projector -> causal language model."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from textbind import IGNORE_INDEX
from textbind.config import MODULE_NAMES


def query_image(qformer: nn.Module, query_tokens: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """The Q-Former's (N, Q, Dq) outputs for (1, Q, Dq) query tokens reading (N, P, Dv) image features."""
    image_attention = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
    return qformer(
        query_embeds=query_tokens.expand(image_features.shape[0], -1, -1),
        encoder_hidden_states=image_features,
        encoder_attention_mask=image_attention,
    ).last_hidden_state


@dataclass
class MIMOutput(ModelOutput):
    """What `MIMModel.forward` returns in every mode; `loss` is None without targets.

    A ModelOutput (a dict underneath) so that DeepSpeed ZeRO-3 finds the output tensors and hooks the
    backward pass, re-gathering the model's own partitioned parameters (`query_tokens`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, L, V); None when only the loss was asked for
    cache: Any = None  # the KV cache with use_cache=True
    num_target_tokens: int | None = None  # supervised positions (0 without targets)

    @property
    def past_key_values(self) -> Any:
        return self.cache


class MIMModel(nn.Module):
    """Images enter the language model as `num_query_tokens` embeddings each, at `<image>` token positions.

    Attribute names follow the original release so its state dicts load by key.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        qformer: nn.Module,
        query_tokens: torch.Tensor,  # (1, Q, Dq)
        language_model: nn.Module,
        image_token_id: int,
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        # kept as a number: ZeRO-3 partitions parameters, leaving them shapeless outside forward
        self._num_query_tokens = int(query_tokens.shape[1])
        self.qformer = qformer
        qformer_hidden = self.query_tokens.shape[-1]
        llm_hidden = language_model.get_input_embeddings().weight.shape[1]
        self.qformer_projection = nn.Linear(qformer_hidden, llm_hidden)
        self.language_model = language_model
        self.image_token_id = image_token_id
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both generations.
        decoder_parameters = inspect.signature(language_model.model.forward).parameters
        self._cache_argument = "cache" if "cache" in decoder_parameters else "past_key_values"

    @property
    def num_query_tokens(self) -> int:
        return self._num_query_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.qformer_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.qformer_projection.weight.device

    def set_trainable(self, names: list[str] | tuple[str, ...]) -> None:
        """Train exactly the named top-level modules; freeze the rest."""
        unknown = set(names) - set(MODULE_NAMES)
        if unknown:
            raise ValueError(f"unknown module name(s) {sorted(unknown)}; choose from {list(MODULE_NAMES)}")
        for name in MODULE_NAMES:
            part = getattr(self, name)
            parameters = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            for parameter in parameters:
                parameter.requires_grad_(name in names)

    def trainable_module_names(self) -> list[str]:
        names = []
        for name in MODULE_NAMES:
            part = getattr(self, name)
            parameters = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            if any(parameter.requires_grad for parameter in parameters):
                names.append(name)
        return names

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, Q, D_llm) embeddings ready to stand in for `<image>` tokens."""
        vision_trainable = any(parameter.requires_grad for parameter in self.vision_model.parameters())
        vision_dtype = next(self.vision_model.parameters()).dtype
        # A frozen encoder needs no graph: skipping it saves the activations of the whole ViT.
        with torch.set_grad_enabled(vision_trainable and torch.is_grad_enabled()):
            image_features = self.vision_model(pixel_values=pixel_values.to(vision_dtype)).last_hidden_state
        image_features = image_features.to(self.query_tokens.dtype)  # (N, P, Dv)
        query_outputs = query_image(self.qformer, self.query_tokens, image_features)  # (N, Q, Dq)
        return self.qformer_projection(query_outputs)  # (N, Q, D_llm)

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each run of Q `<image>` tokens replaced by one image's Q embeddings.

        Images are consumed in row-major order of their tokens: batch row first, then position.
        """
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, D)
        image_token_mask = input_ids == self.image_token_id
        num_image_tokens = int(image_token_mask.sum())
        num_image_embeds = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if num_image_tokens != num_image_embeds:
            num_images = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(
                f"the inputs hold {num_image_tokens} <image> tokens but {num_images} image(s) x "
                f"{self.num_query_tokens} query tokens = {num_image_embeds} image embeddings were given"
            )
        if num_image_tokens == 0:
            return inputs_embeds
        return inputs_embeds.masked_scatter(image_token_mask.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L) padding mask or (B, 1, L, L_kv) additive float
        position_ids: torch.Tensor | None = None,  # (B, L)
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W), N = images in the batch
        image_embeds: torch.Tensor | None = None,  # (N, Q, D_llm), instead of pixel_values
        targets: torch.Tensor | None = None,  # (B, L): the token each position must predict, or -100
        past_key_values: Any = None,
        use_cache: bool = False,
        return_logits: bool = True,
        logits_to_keep: int = 0,  # > 0: logits of the last k positions only (decoding needs one)
        loss_reduction: str = "mean",  # "mean" over supervised tokens, or "sum" (the caller divides)
    ) -> MIMOutput:
        if pixel_values is not None and image_embeds is None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values)
        inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        outputs = self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self._cache_argument: past_key_values},
        )
        hidden_states = outputs.last_hidden_state  # (B, L, D)
        lm_head = self.language_model.get_output_embeddings()
        logits = None
        if return_logits:
            logits = lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        loss = None
        num_target_tokens = 0
        if targets is not None:
            # `targets` are already aligned with positions (no shift): caption branches make the
            # usual "label = next token" rule wrong at their boundaries.
            labelled = targets != IGNORE_INDEX
            num_target_tokens = int(labelled.sum())
            if logits is not None and not logits_to_keep:
                selected_logits = logits[labelled]
            else:
                # Project only the positions that carry a target: most of a sequence has none.
                selected_logits = lm_head(hidden_states[labelled])
            if num_target_tokens == 0:
                loss = selected_logits.sum() * 0.0
            else:
                loss = F.cross_entropy(selected_logits.float(), targets[labelled], reduction=loss_reduction)
        return MIMOutput(
            loss=loss,
            logits=logits,
            cache=getattr(outputs, self._cache_argument) if use_cache else None,
            num_target_tokens=num_target_tokens,
        )
