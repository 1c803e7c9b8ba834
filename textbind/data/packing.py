"""Packed sequences: several encoded samples (main sequence + caption branches) side by side in one row.

`data.pack_length` > 0 turns packing on. A micro-batch still holds `train.micro_batch_size` samples, so the
global batch, the epochs and the schedule count samples exactly as without packing; packing only changes
how those samples are laid out: into as few rows of at most `pack_length` tokens as first-fit (longest
first) needs, balanced across those rows, instead of one right-padded row each.

Why the buffer is the micro-batch: the samples packed together are exactly the samples the unpacked stream
would have put in that micro-batch, so no sample is ever held back across micro-batches and the stream's
resumable position (each worker's cursor of raw items) means what it meant before. Resuming needs no
buffer state, and the packed run sees the same samples in the same steps as the padded one.

Each sample keeps its own position ids (from 0) and branch structure; `Batch.sample_ids` says which sample
of its row each token belongs to, and the attention rule (textbind.data.collate.attention_rule) lets no
token see another sample. Pixel rows follow row-major token order, as MIMModel.embed_inputs consumes them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from textbind.data.collate import PADDING_SEGMENT, Batch
from textbind.data.conversation import Conversation, DataError
from textbind.data.samples import pixel_values_for
from textbind.data.sequence import ConversationEncoder, EncodedConversation
from textbind.model.mim import IGNORE_INDEX


def encode_within(encoder: ConversationEncoder, conversation: Conversation, pack_length: int) -> EncodedConversation:
    """Encode a conversation for training so that main sequence + branches fit in `pack_length` tokens.

    The encoder's `max_input_length` bounds the main sequence only; the branches come on top. A sample
    still longer than a row is encoded again with its main sequence cut shorter, by the encoder's own
    rule (never inside an image; an image cut off loses its branch), until it fits.
    """
    encoded = encoder.encode(conversation)
    while len(encoded) > pack_length:
        shorter = copy.copy(encoder)
        shorter.max_length = encoded.main_length - (len(encoded) - pack_length)
        if shorter.max_length < 1:
            raise DataError(f"{conversation.source}: cannot fit in data.pack_length={pack_length} tokens")
        encoded = shorter.encode(conversation)
    return encoded


def prepare_packable_sample(conversation: Conversation, encoder: ConversationEncoder, image_processor: Any,
                            pack_length: int) -> tuple[EncodedConversation, torch.Tensor]:
    """Like textbind.data.samples.prepare_sample, truncated to fit one row of `pack_length` tokens."""
    encoded = encode_within(encoder, conversation, pack_length)
    return encoded, pixel_values_for(encoded.images, image_processor, conversation.source)


def first_fit(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing (longest first, ties by index), deterministic.

    A sample longer than `pack_length` gets a row of its own (callers truncate first; see encode_within).
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        for row, space in enumerate(free):
            if lengths[index] <= space:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(pack_length - lengths[index])
    return rows


def pack_rows(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Sample indices per row: as few rows as first-fit needs, balanced so that little padding remains.

    First-fit decides the number of rows r; then each sample, longest first, goes to the shortest of r
    rows (ties: the lower row). The rows are right-padded to the longest, so balancing them removes
    the padding a full first row and a ragged last row would leave. When balancing would overflow a
    row, the first-fit rows are kept. Deterministic: a function of the lengths alone.
    """
    rows = first_fit(lengths, pack_length)
    if len(rows) == 1:
        return rows
    balanced: list[list[int]] = [[] for _ in rows]
    filled = [0] * len(rows)
    for index in sorted(range(len(lengths)), key=lambda index: (-lengths[index], index)):
        row = min(range(len(rows)), key=lambda row: (filled[row], row))
        balanced[row].append(index)
        filled[row] += lengths[index]
    return balanced if max(filled) <= max(pack_length, max(lengths)) else rows


def collate_packed(samples: list[tuple[EncodedConversation, torch.Tensor]], pad_token_id: int, pack_length: int,
                   num_skipped: int = 0) -> Batch:
    """(encoded, pixel_values) pairs packed into rows of at most `pack_length` tokens, one Batch.

    Rows (pack_rows) are right-padded to the longest row. Within a row, samples sit in the order they
    were placed, longest first; `sources` keeps the order the samples came in.
    """
    rows = pack_rows([len(encoded) for encoded, _ in samples], pack_length)
    length = max(sum(len(samples[index][0]) for index in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, PADDING_SEGMENT, dtype=torch.long)
    branch_prefix = torch.zeros(shape, dtype=torch.long)
    sample_ids = torch.full(shape, PADDING_SEGMENT, dtype=torch.long)
    pixel_rows = []
    for row, members in enumerate(rows):
        offset = 0
        for slot, index in enumerate(members):
            encoded, pixel_values = samples[index]
            span = slice(offset, offset + len(encoded))
            input_ids[row, span] = torch.tensor(encoded.input_ids)
            targets[row, span] = torch.tensor(encoded.targets)
            position_ids[row, span] = torch.tensor(encoded.position_ids)
            segment_ids[row, span] = torch.tensor(encoded.segment_ids)
            branch_prefix[row, span] = torch.tensor(encoded.branch_prefix)
            sample_ids[row, span] = slot
            offset += len(encoded)
            if pixel_values is not None and pixel_values.shape[0]:
                pixel_rows.append(pixel_values)  # this sample's images, in its token order
    pixel_values = torch.cat(pixel_rows) if pixel_rows else torch.zeros(0, 3, 1, 1)
    return Batch(input_ids, targets, position_ids, segment_ids, branch_prefix, pixel_values,
                 num_samples=len(samples), num_skipped=num_skipped,
                 sources=tuple(encoded.source for encoded, _ in samples), sample_ids=sample_ids)
