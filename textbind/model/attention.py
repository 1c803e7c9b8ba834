"""The language model's attention paths: sdpa with an additive mask, or flex attention with a BlockMask.

`model.attn_implementation: flex_attention` builds the language model with the implementation registered
here under FLEX_IMPLEMENTATION, a dispatcher through transformers' own extension points
(`AttentionInterface.register`, `AttentionMaskInterface.register`; no patching):
  - a batch that needs a structured mask (caption branches or packed samples) gets a flex-attention
    `BlockMask` built from its sample ids, segment ids, branch prefixes and position ids with the same
    rule as the CPU mask (textbind.data.collate.attention_rule): document-causal + branch rules, computed
    by blocks, no (L, L) mask in memory;
  - a plain batch (one sample per row, no branch) keeps its (B, L) padding mask and goes to
    transformers' sdpa (which picks the flash kernel on a GPU when nothing is padded).
transformers' stock "flex_attention" implementation is not used: it would send plain batches through
flex as well (their 2-D masks become BlockMasks) and compile on the CPU too.

On CUDA the flex kernel and the BlockMask construction are compiled (dynamic=False) and batches are
padded to a multiple of FLEX_BLOCK tokens, so there is one compilation per shape bucket
(rows, length rounded up). On the CPU flex attention runs its unfused reference implementation
(forward only: torch has no CPU backward for it); train there with sdpa.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from textbind.data.collate import Batch, attention_mask_for, attention_rule

FLEX_IMPLEMENTATION = "textbind_flex"
FLEX_BLOCK = 128  # flex attention's block size: the length buckets are its multiples
# What `model.attn_implementation` accepts -> the name the language model is built with.
ATTENTION_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flex_attention": FLEX_IMPLEMENTATION}


@functools.cache
def _compiled_flex_attention() -> Any:
    # Each new shape bucket is a recompilation of the same code object: allow enough of them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def structured_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, L, D)
    key: torch.Tensor,  # (B, H_kv, L, D)
    value: torch.Tensor,  # (B, H_kv, L, D)
    attention_mask: torch.Tensor | BlockMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Flex attention for a BlockMask, transformers' sdpa for anything else; returns (B, L, H, D)."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout > 0 and module.training:
        raise ValueError("flex attention here has no attention dropout: set the model's attention_dropout to 0")
    heads, key_heads = query.shape[1], key.shape[1]
    # grouped-query attention: flex broadcasts kv heads itself when the query head count is a power of 2
    enable_gqa = heads != key_heads and heads & (heads - 1) == 0
    if heads != key_heads and not enable_gqa:
        key, value = repeat_kv(key, heads // key_heads), repeat_kv(value, heads // key_heads)
    attend = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    output = attend(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=enable_gqa)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLEX_IMPLEMENTATION, structured_attention)
# Plain batches arrive as 2-D padding masks: turn them into what sdpa takes (None for plain causal).
AttentionMaskInterface.register(FLEX_IMPLEMENTATION, sdpa_mask)


def language_model_attention(name: str) -> str:
    """The attn_implementation to build the language model with, for a `model.attn_implementation` value."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be one of {sorted(ATTENTION_IMPLEMENTATIONS)}, got {name!r}")
    return ATTENTION_IMPLEMENTATIONS[name]


def uses_flex(model: torch.nn.Module) -> bool:
    """Whether the MIM model's language model runs the flex dispatcher."""
    config = model.language_model.config
    return getattr(config, "_attn_implementation", None) == FLEX_IMPLEMENTATION


def bucket_length(length: int) -> int:
    """The padded length of a flex batch: a multiple of FLEX_BLOCK, so compilations are few."""
    return -(-length // FLEX_BLOCK) * FLEX_BLOCK


def block_mask_for(batch: Batch) -> BlockMask:
    """The BlockMask of `attention_rule` for a batch already on its device (lengths padded by the caller)."""
    segment_ids, branch_prefix, position_ids = batch.segment_ids, batch.branch_prefix, batch.position_ids
    sample_ids = batch.sample_ids
    if sample_ids is None:
        sample_ids = torch.where(segment_ids < 0, segment_ids, 0)
    batch_size, length = segment_ids.shape

    def mask_mod(row: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return attention_rule(segment_ids[row, query], segment_ids[row, key], sample_ids[row, query],
                              sample_ids[row, key], branch_prefix[row, query], position_ids[row, key], query, key)

    device = segment_ids.device
    return create_block_mask(mask_mod, batch_size, None, length, length, device=device,
                             _compile=device.type == "cuda")


def attention_inputs(model: torch.nn.Module, batch: Batch) -> tuple[Batch, torch.Tensor | BlockMask]:
    """The batch (padded to a shape bucket on the flex path) and the attention mask for the model.

    `batch` is on the model's device. Padding added here is masked and carries no target.
    """
    if uses_flex(model) and batch.needs_structured_mask:
        padded = batch.padded_to(bucket_length(batch.input_ids.shape[1]))
        return padded, block_mask_for(padded)
    attn_implementation = getattr(model.language_model.config, "_attn_implementation", None)
    return batch, attention_mask_for(batch, model.dtype, attn_implementation)
