"""Batching encoded conversations: right padding, the branch-aware attention mask, image pixels."""

from __future__ import annotations

from dataclasses import dataclass, fields

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

    @property
    def has_branches(self) -> bool:
        return bool((self.segment_ids > 0).any())

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
    branch_prefix = torch.zeros((batch_size, length), dtype=torch.long)
    pixel_rows = []
    for row, (encoded, pixel_values) in enumerate(samples):
        size = len(encoded)
        input_ids[row, :size] = torch.tensor(encoded.input_ids)
        targets[row, :size] = torch.tensor(encoded.targets)
        position_ids[row, :size] = torch.tensor(encoded.position_ids)
        segment_ids[row, :size] = torch.tensor(encoded.segment_ids)
        branch_prefix[row, :size] = torch.tensor(encoded.branch_prefix)
        if pixel_values is not None and pixel_values.shape[0]:
            pixel_rows.append(pixel_values)
    pixel_values = torch.cat(pixel_rows) if pixel_rows else torch.zeros(0, 3, 1, 1)
    return Batch(input_ids, targets, position_ids, segment_ids, branch_prefix, pixel_values,
                 num_samples=batch_size, num_skipped=num_skipped,
                 sources=tuple(encoded.source for encoded, _ in samples))


def allowed_attention(segment_ids: torch.Tensor, branch_prefix: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool: may query i attend to key j?

    Main tokens attend causally to main tokens. A branch token attends to main tokens [0, p) and
    causally to its own branch, never to another branch. Padding keys are hidden; a padding query
    sees itself only, so its row is never empty.
    """
    length = segment_ids.shape[1]
    positions = torch.arange(length, device=segment_ids.device)
    causal = positions[None, :] <= positions[:, None]  # (L, L): key j <= query i
    query_segment = segment_ids[:, :, None]  # (B, L, 1)
    key_segment = segment_ids[:, None, :]  # (B, 1, L)
    key_is_main = key_segment == 0
    main_to_main = (query_segment == 0) & key_is_main
    branch_to_prefix = (query_segment > 0) & key_is_main & (positions[None, None, :] < branch_prefix[:, :, None])
    branch_to_own = (query_segment > 0) & (key_segment == query_segment)
    allowed = causal & (main_to_main | branch_to_prefix | branch_to_own)
    padding_query = query_segment == PADDING_SEGMENT
    return allowed | (padding_query & torch.eye(length, dtype=torch.bool, device=segment_ids.device))


def refuse_flash_attention(batch: Batch, attn_implementation: str | None) -> None:
    """Raise ValueError when `attn_implementation` is a FlashAttention kernel: it takes only padding masks
    (it would silently attend causally across branches). Needs no flash-attn package to tell."""
    if attn_implementation is None or "flash" not in attn_implementation:
        return
    rows = [batch.sources[row] for row in range(len(batch.sources)) if bool((batch.segment_ids[row] > 0).any())]
    shown = ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")
    raise ValueError(
        f"model.attn_implementation={attn_implementation} cannot apply the branch attention mask this batch needs "
        f"(caption branches or packed samples{': ' + shown if shown else ''}): FlashAttention takes padding masks "
        "only. Use model.attn_implementation=sdpa (or eager), or flex_attention on a GPU."
    )


def attention_mask_for(batch: Batch, dtype: torch.dtype, attn_implementation: str | None = None) -> torch.Tensor:
    """The mask to give the model: a (B, L) padding mask when no sample has a branch (the fast, plain
    causal path), else the (B, 1, L, L) additive float mask of `allowed_attention`.

    `attn_implementation` (the language model's) is checked against the 4-D mask: see
    `refuse_flash_attention`.
    """
    if not batch.has_branches:
        return (batch.segment_ids != PADDING_SEGMENT).long()
    refuse_flash_attention(batch, attn_implementation)
    allowed = allowed_attention(batch.segment_ids, batch.branch_prefix)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
