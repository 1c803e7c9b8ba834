"""Batching encoded conversations: right padding, the branch- and sample-aware attention mask, image pixels.

One rule decides who sees whom (`attention_rule`); the CPU's additive float mask and the GPU's
flex-attention BlockMask (textbind.model.attention) are both built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from textbind import IGNORE_INDEX
from textbind.data.sequence import EncodedConversation

PADDING_SEGMENT = -1


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    segment_ids: torch.Tensor  # (B, L): 0 main, k branch k, -1 padding
    branch_prefix: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor  # (N, 3, H, W): the batch's images in row-major token order
    num_samples: int = 0
    num_skipped: int = 0  # samples dropped by the loader (unreadable images, corrupt records)
    sources: tuple[str, ...] = ()  # where each sample came from ("train.json record 3", "shard sample KEY")
    # (B, L): which sample of its row a token belongs to (0, 1, ... left to right), -1 padding; None: one
    # sample per row. Packed rows hold several samples that must not see each other.
    sample_ids: torch.Tensor | None = None

    @property
    def has_branches(self) -> bool:
        return bool((self.segment_ids > 0).any())

    @property
    def is_packed(self) -> bool:
        return self.sample_ids is not None and bool((self.sample_ids > 0).any())

    @property
    def needs_structured_mask(self) -> bool:
        """Whether plain causal attention with a padding mask is wrong for this batch."""
        return self.has_branches or self.is_packed

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids != PADDING_SEGMENT).sum())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=True)
                if item.name == "pixel_values" and dtype is not None:
                    value = value.to(dtype)
            moved[item.name] = value
        return Batch(**moved)

    def padded_to(self, length: int, pad_token_id: int = 0) -> Batch:
        """The same batch right-padded to `length` tokens (shape buckets for compiled kernels)."""
        extra = length - self.input_ids.shape[1]
        if extra <= 0:
            return self

        def pad(tensor: torch.Tensor | None, value: int) -> torch.Tensor | None:
            return None if tensor is None else torch.nn.functional.pad(tensor, (0, extra), value=value)

        return replace(
            self, input_ids=pad(self.input_ids, pad_token_id), targets=pad(self.targets, IGNORE_INDEX),
            position_ids=pad(self.position_ids, 0), segment_ids=pad(self.segment_ids, PADDING_SEGMENT),
            branch_prefix=pad(self.branch_prefix, 0), sample_ids=pad(self.sample_ids, PADDING_SEGMENT),
        )


def collate(
    samples: list[tuple[EncodedConversation, torch.Tensor]], pad_token_id: int, num_skipped: int = 0
) -> Batch:
    """Right-pad (encoded, pixel_values) pairs into one Batch; pixel rows follow token order."""
    length = max(len(encoded) for encoded, _ in samples)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    targets = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch_size, length), dtype=torch.long)
    segment_ids = torch.full((batch_size, length), PADDING_SEGMENT, dtype=torch.long)
    sample_ids = torch.full((batch_size, length), PADDING_SEGMENT, dtype=torch.long)
    branch_prefix = torch.zeros((batch_size, length), dtype=torch.long)
    pixel_rows = []
    for row, (encoded, pixel_values) in enumerate(samples):
        size = len(encoded)
        input_ids[row, :size] = torch.tensor(encoded.input_ids)
        targets[row, :size] = torch.tensor(encoded.targets)
        position_ids[row, :size] = torch.tensor(encoded.position_ids)
        segment_ids[row, :size] = torch.tensor(encoded.segment_ids)
        branch_prefix[row, :size] = torch.tensor(encoded.branch_prefix)
        sample_ids[row, :size] = 0
        if pixel_values is not None and pixel_values.shape[0]:
            pixel_rows.append(pixel_values)
    pixel_values = torch.cat(pixel_rows) if pixel_rows else torch.zeros(0, 3, 1, 1)
    return Batch(input_ids, targets, position_ids, segment_ids, branch_prefix, pixel_values,
                 num_samples=batch_size, num_skipped=num_skipped,
                 sources=tuple(encoded.source for encoded, _ in samples), sample_ids=sample_ids)




def attention_rule(query_segment, key_segment, query_sample, key_sample, query_prefix, key_position,
                   query_index, key_index):
    """May the query token attend to the key token? Elementwise on broadcastable tensors (or 0-d ones,
    as flex attention's mask_mod passes), so the CPU mask and the GPU BlockMask share one definition.

    Only tokens of the same sample, causally (key index <= query index: a sample is contiguous in its
    row). Inside it: main tokens see main tokens; a branch token sees the main tokens whose position id
    is below its branch prefix p (main positions count from 0 in each sample) and its own branch, never
    another branch. A padding query sees itself only, so its row is never empty.
    """
    key_is_main = key_segment == 0
    query_is_branch = query_segment > 0
    inside = (query_sample == key_sample) & (key_index <= query_index)
    main_to_main = (query_segment == 0) & key_is_main
    branch_to_prefix = query_is_branch & key_is_main & (key_position < query_prefix)
    branch_to_own = query_is_branch & (key_segment == query_segment)
    padding_self = (query_segment == PADDING_SEGMENT) & (key_index == query_index)
    return (inside & (main_to_main | branch_to_prefix | branch_to_own)) | padding_self


def refuse_flash_attention(batch: Batch, attn_implementation: str | None) -> None:
    """Raise ValueError when `attn_implementation` is a FlashAttention kernel: it takes only padding masks
    (it would silently attend causally across branches). Needs no flash-attn package to tell."""
    if attn_implementation is None or "flash" not in attn_implementation:
        return
    rows = [batch.sources[row] for row in range(len(batch.sources))
            if bool((batch.segment_ids[row] > 0).any()) or batch.is_packed]
    shown = ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")
    raise ValueError(
        f"model.attn_implementation={attn_implementation} cannot apply the branch attention mask this batch needs "
        f"(caption branches or packed samples{': ' + shown if shown else ''}): FlashAttention takes padding masks "
        "only. Use model.attn_implementation=sdpa (or eager), or flex_attention on a GPU."
    )


def _row_inputs(segment_ids: torch.Tensor, branch_prefix: torch.Tensor, sample_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ids and key positions, defaulting to one sample per row counted from position 0."""
    if sample_ids is None:
        sample_ids = torch.where(segment_ids == PADDING_SEGMENT, PADDING_SEGMENT, 0)
    if position_ids is None:
        length = segment_ids.shape[1]
        position_ids = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    return sample_ids, position_ids


def _allowed_rows(segment_ids: torch.Tensor, branch_prefix: torch.Tensor, sample_ids: torch.Tensor,
                  position_ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(stop - start, L) bool: the rule for queries start..stop-1 of one row (1-D inputs of length L)."""
    query = slice(start, stop)
    query_index = torch.arange(start, stop, device=segment_ids.device)[:, None]
    key_index = torch.arange(segment_ids.shape[0], device=segment_ids.device)[None, :]
    return attention_rule(segment_ids[query, None], segment_ids[None, :], sample_ids[query, None],
                          sample_ids[None, :], branch_prefix[query, None], position_ids[None, :],
                          query_index, key_index)


def allowed_attention(segment_ids: torch.Tensor, branch_prefix: torch.Tensor, sample_ids: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, L) bool: may query i attend to key j? (`attention_rule`; a reference for tests, dense.)"""
    sample_ids, position_ids = _row_inputs(segment_ids, branch_prefix, sample_ids, position_ids)
    length = segment_ids.shape[1]
    return torch.stack([
        _allowed_rows(segment_ids[row], branch_prefix[row], sample_ids[row], position_ids[row], 0, length)
        for row in range(segment_ids.shape[0])
    ])


def attention_mask_for(batch: Batch, dtype: torch.dtype, attn_implementation: str | None = None,
                       chunk_elements: int = 1 << 22) -> torch.Tensor:
    """The mask to give an sdpa/eager model: a (B, L) padding mask when the batch is plain (no caption
    branch, one sample per row: the fast causal path), else the (B, 1, L, L) additive float mask of
    `attention_rule`. `attn_implementation` (the language model's) is checked against the 4-D mask: see
    `refuse_flash_attention`.

    The float mask is the only O(B*L*L) tensor made: it is filled in place, a block of query rows at a
    time, so the boolean temporaries stay under `chunk_elements` elements.
    """
    if not batch.needs_structured_mask:
        return (batch.segment_ids != PADDING_SEGMENT).long()
    refuse_flash_attention(batch, attn_implementation)
    sample_ids, position_ids = _row_inputs(batch.segment_ids, batch.branch_prefix, batch.sample_ids,
                                           batch.position_ids)
    batch_size, length = batch.segment_ids.shape
    mask = torch.full((batch_size, 1, length, length), torch.finfo(dtype).min, dtype=dtype,
                      device=batch.segment_ids.device)
    rows_per_chunk = max(1, chunk_elements // length)
    for row in range(batch_size):
        for start in range(0, length, rows_per_chunk):
            stop = min(length, start + rows_per_chunk)
            allowed = _allowed_rows(batch.segment_ids[row], batch.branch_prefix[row], sample_ids[row],
                                    position_ids[row], start, stop)
            mask[row, 0, start:stop].masked_fill_(allowed, 0.0)
    return mask
