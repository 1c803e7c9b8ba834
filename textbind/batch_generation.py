"""Batched interleaved decoding: many answers share one KV cache, each row with its own length and its own images.

Each row of the batch follows exactly the rules of `textbind.generation` (the same `AnswerDecoder`
drives it); only the model calls differ. The cache is one buffer per layer of shape
(rows, kv heads, capacity, head dim) in which slot i of a row holds that row's position i. A
token at position p attends the slots 0..p of its own row, so an additive float mask "slot <=
position" covers everything at once: the padding after a short row, and the stale entries left
behind when a row is rolled back (to put an image where its caption began, the row simply
writes the image at the `<start>` position; the caption's slots lie beyond and are masked, and
later writes overwrite them). Position ids are per row.

A decoding step feeds one token for every row that is writing text, in one forward pass.
Multi-token feeds (a new request's prompt, an image's Q embeddings, a caption kept as text) run
for their row alone, between steps, over the same buffer. Captions closed in the same step are
rendered together (in turn, through the one-caption `ImageDecoder` protocol). Requests join and
leave between steps (continuous batching); the active rows are kept contiguous, so a step reads
the first `n` rows of the buffer without copying.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers.cache_utils import Cache

from textbind.data.conversation import Conversation
from textbind.generation import (
    AnswerDecoder,
    DecodeAction,
    DecodingConfig,
    DoneEvent,
    FeedImage,
    FeedTokens,
    Finished,
    GenerationEvent,
    InterleavedGenerator,
    LogitsHook,
    RenderCaption,
)

logger = logging.getLogger(__name__)

CAPACITY_BLOCK = 128  # the cache grows by this many slots at a time


class SlotCache(Cache):
    """A KV cache whose rows write at their own positions (slot = position); see the module docstring.

    Before each forward pass, `select(rows, slots)` names the contiguous rows taking part and the
    slot of each of their new tokens; `update` writes there and returns those rows' whole buffer.
    """

    def __init__(self, num_rows: int) -> None:
        super().__init__(layers=[])
        self.num_rows = num_rows
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer (rows, kv heads, capacity, head dim)
        self.values: list[torch.Tensor] = []
        self._rows = slice(0, 0)
        self._slots: torch.Tensor | None = None  # (b, q) slot of each new token

    def select(self, rows: slice, slots: torch.Tensor, last_slot: int) -> None:
        """The next forward pass feeds rows `rows` (b of them), token k of row r going to slot `slots[r, k]`;
        `last_slot` is the largest of them (given by the caller, which knows it without a device sync)."""
        self._rows = rows
        self._slots = slots
        needed = last_slot + 1
        if needed > self.capacity:
            self.capacity = -(-needed // CAPACITY_BLOCK) * CAPACITY_BLOCK

    def _grown(self, buffer: torch.Tensor) -> torch.Tensor:
        missing = self.capacity - buffer.shape[2]
        if missing <= 0:
            return buffer
        padding = buffer.new_zeros(buffer.shape[0], buffer.shape[1], missing, buffer.shape[3])
        return torch.cat([buffer, padding], dim=2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, kv heads, q, head dim) new keys/values -> (b, kv heads, capacity, head dim) of the selected rows."""
        if layer_idx == len(self.keys):
            shape = (self.num_rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
        self.keys[layer_idx] = keys = self._grown(self.keys[layer_idx])
        self.values[layer_idx] = values = self._grown(self.values[layer_idx])
        index = self._slots[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
        keys[self._rows].scatter_(2, index, key_states)  # a slice of rows is a view: written in place
        values[self._rows].scatter_(2, index, value_states)
        return keys[self._rows], values[self._rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source`'s entries to row `target` (to keep the active rows contiguous)."""
        for buffer in (*self.keys, *self.values):
            buffer[target] = buffer[source]


def attention_mask(positions: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, q) positions -> (b, 1, q, capacity) additive mask: a token sees the slots up to its own position."""
    slots = torch.arange(capacity, device=positions.device)
    visible = slots.view(1, 1, 1, capacity) <= positions[:, None, :, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


@dataclass
class PreparedRequest:
    """A conversation checked and encoded (on any thread), ready to join the batch."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    config: DecodingConfig
    render_images: bool = True  # False: captions are reported, nothing is rendered (as without a decoder)
    logits_processor: LogitsHook | None = None


@dataclass
class BatchRequest:
    """One answer in progress; `events` collects what it produced since the caller last took them."""

    prepared: PreparedRequest
    answer: AnswerDecoder
    action: DecodeAction | None = None
    events: list[GenerationEvent] = field(default_factory=list)
    error: BaseException | None = None  # set when this request failed on its own (e.g. its image decoder raised)
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.answer.finished or self.error is not None or self.cancelled

    def collect(self) -> None:
        self.events.extend(self.answer.take_events())

    def take_events(self) -> list[GenerationEvent]:
        events, self.events = self.events, []
        return events


class BatchedGenerator:
    """Decodes up to `max_batch_size` answers together, with the model, tokenizer and decoder of `generator`.

    Not thread-safe: one thread calls `add` and `step`; `prepare` may run on any thread.
    """

    def __init__(self, generator: InterleavedGenerator, max_batch_size: int = 8) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.generator = generator
        self.model = generator.model
        self.max_batch_size = max_batch_size
        self.cache = SlotCache(max_batch_size)
        self.rows: list[BatchRequest] = []  # row r of the cache belongs to rows[r]
        self.waiting: deque[BatchRequest] = deque()
        self.steps = 0  # batched decoding steps run so far
        self.peak_batch_size = 0  # the most rows one step has decoded together
        self.image_token_id = generator.control.image_token_id
        # The mask is added to the attention scores, in the language model's dtype.
        self.mask_dtype = self.model.language_model.get_input_embeddings().weight.dtype

    def prepare(
        self, conversation: Conversation, config: DecodingConfig | None = None, *, render_images: bool = True,
        logits_processor: LogitsHook | None = None,
    ) -> PreparedRequest:
        """Check and encode a conversation (raises DataError as `InterleavedGenerator.stream` does)."""
        config = (config or DecodingConfig()).validate()
        prompt_ids, pixel_values = self.generator.prepare_prompt(conversation)
        return PreparedRequest(prompt_ids, pixel_values, config, render_images, logits_processor)

    def add(self, prepared: PreparedRequest) -> BatchRequest:
        """Queue a request; it joins the batch at the next step with a free row."""
        answer = self.generator.answer_decoder(prepared.config, len(prepared.prompt_ids), prepared.logits_processor)
        request = BatchRequest(prepared, answer)
        self.waiting.append(request)
        return request

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    # --- model calls --------------------------------------------------------------------------------------

    def _forward(
        self, rows: slice, input_ids: torch.Tensor, positions: torch.Tensor, last_position: int, **inputs: Any
    ) -> torch.Tensor:
        """Feed (b, q) tokens at (b, q) positions (at most `last_position`) for `rows`; (b, V) last logits."""
        self.cache.select(rows, positions, last_position)
        mask = attention_mask(positions, self.cache.capacity, self.mask_dtype)
        output = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
            use_cache=True, logits_to_keep=1, **inputs,
        )
        return output.logits[:, -1]

    def _positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.model.device).unsqueeze(0)  # (1, count)

    def _feed_one(self, row: int, action: FeedTokens | FeedImage) -> torch.Tensor:
        """A multi-token feed for one row alone; (V,) logits."""
        rows = slice(row, row + 1)
        if isinstance(action, FeedTokens):
            input_ids = torch.tensor([action.token_ids], device=self.model.device)  # (1, n)
            count = len(action.token_ids)
            positions = self._positions(action.position, count)
            return self._forward(rows, input_ids, positions, action.position + count - 1)[0]
        image_embeds = self.generator.encode_image(action.image)  # (1, Q, D)
        count = image_embeds.shape[1]
        input_ids = torch.full((1, count), self.image_token_id, device=self.model.device)  # (1, Q)
        positions = self._positions(action.position, count)
        return self._forward(rows, input_ids, positions, action.position + count - 1, image_embeds=image_embeds)[0]

    # --- scheduling ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, bring every row to a one-token feed (rendering and feeding images), decode
        one token for all of them together, and release the finished rows."""
        self._release()
        while self.waiting and len(self.rows) < self.max_batch_size:
            request = self.waiting.popleft()
            if request.cancelled:
                continue
            self.rows.append(request)
            row = len(self.rows) - 1
            prepared = request.prepared
            input_ids = torch.tensor([prepared.prompt_ids], device=self.model.device)  # (1, L)
            positions = self._positions(0, len(prepared.prompt_ids))
            logits = self._forward(slice(row, row + 1), input_ids, positions, len(prepared.prompt_ids) - 1,
                                   pixel_values=prepared.pixel_values)[0]
            request.action = request.answer.advance(logits)
            request.collect()
        self._settle()
        self._release()
        if not self.rows:
            return
        token_ids = torch.tensor([[request.action.token_ids[0]] for request in self.rows], device=self.model.device)
        row_positions = [request.action.position for request in self.rows]
        positions = torch.tensor([[position] for position in row_positions], device=self.model.device)  # (b, 1)
        logits = self._forward(slice(0, len(self.rows)), token_ids, positions, max(row_positions))  # (b, V)
        self.steps += 1
        self.peak_batch_size = max(self.peak_batch_size, len(self.rows))
        for row, request in enumerate(self.rows):
            request.action = request.answer.advance(logits[row])
            request.collect()
        self._release()

    def _settle(self) -> None:
        """Run every row's actions until it waits for a one-token feed or has finished."""
        while True:
            to_render = []
            for row, request in enumerate(self.rows):
                while not request.finished:
                    action = request.action
                    if isinstance(action, FeedTokens) and len(action.token_ids) == 1:
                        break
                    if isinstance(action, Finished):
                        break
                    if isinstance(action, RenderCaption):
                        to_render.append(request)
                        break
                    request.action = request.answer.advance(self._feed_one(row, action))
                    request.collect()
            if not to_render:
                return
            for request, image in zip(to_render, self._render(to_render), strict=True):
                if isinstance(image, BaseException):
                    request.error = image
                    continue
                request.action = request.answer.image_ready(image)
                request.collect()

    def _render(self, requests: list[BatchRequest]) -> list[Image.Image | None | BaseException]:
        """The captions closed together: in one call when the decoder has `render_batch(captions, seeds)`
        (SDXL), else in turn. A decoder failure fails only its own request (the whole group when batched)."""
        decoder = self.generator.image_decoder
        rendering = [request for request in requests if request.prepared.render_images]
        render_batch = getattr(decoder, "render_batch", None)
        if decoder is not None and render_batch is not None and len(rendering) > 1:
            actions = [request.action for request in rendering]
            try:
                rendered = render_batch([action.caption for action in actions], [action.seed for action in actions])
                by_request = {id(request): image.convert("RGB") for request, image in zip(rendering, rendered)}
            except Exception as error:  # noqa: BLE001 - reported to the requests' clients, the batch goes on
                logger.exception("the image decoder failed on %d captions", len(rendering))
                by_request = {id(request): error for request in rendering}
            return [by_request.get(id(request)) for request in requests]
        images: list[Image.Image | None | BaseException] = []
        for request in requests:
            action = request.action
            assert isinstance(action, RenderCaption)
            if not request.prepared.render_images:
                images.append(None)
                continue
            try:
                images.append(self.generator.render(action.caption, action.seed))
            except Exception as error:  # noqa: BLE001 - reported to the request's client, the batch goes on
                logger.exception("the image decoder failed on caption %r", action.caption)
                images.append(error)
        return images

    def _release(self) -> None:
        """Drop finished rows; the last active row moves into each freed row so that the rows stay contiguous."""
        row = 0
        while row < len(self.rows):
            if not self.rows[row].finished:
                row += 1
                continue
            last = len(self.rows) - 1
            if row != last:
                self.cache.move_row(last, row)
                self.rows[row] = self.rows[last]
            self.rows.pop()

    def cancel_all(self, error: BaseException) -> list[BatchRequest]:
        """Fail every request (after an error in a shared forward pass); the cache starts afresh."""
        failed = [*self.rows, *self.waiting]
        for request in failed:
            request.error = error
        self.rows, self.waiting = [], deque()
        self.cache = SlotCache(self.max_batch_size)
        return failed

    def generate(
        self, prepared: Iterable[PreparedRequest], join_after: dict[int, list[PreparedRequest]] | None = None
    ) -> list[DoneEvent]:
        """Decode `prepared` to the end; `join_after[k]` are added after step k. DoneEvents in order of addition."""
        requests = [self.add(request) for request in prepared]
        join_after = dict(join_after or {})
        steps = 0
        while self.busy or join_after:
            for request in join_after.pop(steps, []):
                requests.append(self.add(request))
            self.step()
            steps += 1
        results = []
        for request in requests:
            if request.error is not None:
                raise request.error
            results.append(_done_of(request))
        return results


def _done_of(request: BatchRequest) -> DoneEvent:
    for event in reversed(request.events):
        if isinstance(event, DoneEvent):
            return event
    raise RuntimeError("the request ended without a DoneEvent")
