"""Interleaved generation: decode text over a KV cache, render each `<start> caption <end>` and feed the image back.

The loop mirrors training exactly. Let the cache hold the context [0, p) when the model samples
`<start>` (in training, the token at p-1 predicts `<start>`). The caption `<start> c1 .. cn <end>`
is then decoded as its branch was trained: positions p, p+1, ..., seeing [0, p) and itself. On
`<end>` the caption is rendered by the image decoder, the image is encoded again (vision encoder +
Q-Former + projector), the cache is rolled back to length p (the caption's entries are dropped),
and the image's Q embeddings are fed as Q `<image>` tokens at positions p .. p+Q-1, exactly as the
main training sequence holds an assistant image. The logits at the last image position predict
the text after the image, as in training.

Without an image decoder there is no image to feed. The caption then stays in the context as
plain tokens (`<start> c1 .. cn <end>`, `<end>` fed too) and generation goes on after it: nothing
is suppressed or rolled back, so the answer is what a text-only decoder of the same model would
write. The image is reported as an `ImageEvent` with `image=None`, and the finished turn holds
None in its `image_list` (render it, or drop the marker, before feeding the turn back as history).

The rules of one answer (sampling, masks, captions, budgets, events) live in `AnswerDecoder`, apart
from the model: it takes the logits of the last fed position and says what to feed next. The
single-answer `InterleavedGenerator` below and the batched `textbind.batch_generation` both drive it.

Control tokens the model never learned to emit are masked: `<image>` always (image tokens only
ever stand for fed images), `<end>` outside a caption, `<start>` and `</s>` inside one (a caption
ends with `<end>` or at `max_caption_tokens`).

Once `max_images` images were made (at once when it is 0), a `<start>` the model chooses ends the
answer there, with the finish reason "image_limit", and is not kept in `token_ids`. Masking it
instead would make the model write its second choice where it meant to draw, and a model that
wanted an image usually loops on filler ("Of course. Of course. ...") until the token budget ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from PIL import Image
from tokenizers.decoders import DecodeStream
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.data.samples import pixel_values_for
from textbind.data.sequence import ConversationEncoder
from textbind.image_decoder import ImageDecoder
from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

# (token ids sampled so far in this answer, raw next-token logits (V,)) -> logits (V,). Applied
# first, before the control-token masks, so the rules above always hold. Tests use it to record
# logits and to force a token schedule; it can also carry constrained decoding.
LogitsHook = Callable[[list[int], torch.Tensor], torch.Tensor]

FINISH_STOP = "stop"  # the model wrote </s>
FINISH_LENGTH = "length"  # max_new_tokens or the model's context length ran out
FINISH_IMAGE_LIMIT = "image_limit"  # the model began an image after max_images images (see above)


@dataclass
class DecodingConfig:
    """How one assistant turn is decoded."""

    max_new_tokens: int = 512  # every sampled token counts, caption tokens included
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens that cover this probability
    top_k: int = 0  # sample among the k most likely tokens; 0: off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0: off
    repetition_penalty: float = 1.0  # > 1 makes the answer's earlier text tokens less likely (greedy too); 1: off
    seed: int | None = 0  # sampling stream; image k of the answer is rendered with seed + k; None: random
    max_images: int = 4  # images per answer; a further `<start>` ends the answer ("image_limit")
    max_caption_tokens: int = 77  # a caption longer than this is closed as if `<end>` followed (CLIP reads 77)

    def validate(self) -> DecodingConfig:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative (0: off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must lie in [0, 1] (0: off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive (1: off), got {self.repetition_penalty}")
        if self.max_images < 0:
            raise ValueError(f"max_images must not be negative, got {self.max_images}")
        if self.max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be at least 1, got {self.max_caption_tokens}")
        return self


@dataclass
class TextEvent:
    """New answer text, ready to display: concatenating the pieces of a segment gives its text."""

    text: str


@dataclass
class ImageEvent:
    """An image of the answer; `image` is None when no image decoder was given."""

    image: Image.Image | None
    caption: str


@dataclass
class DoneEvent:
    """The finished answer as a stage-2 assistant turn; always the last event."""

    turn: Turn
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH or FINISH_IMAGE_LIMIT
    token_ids: list[int] = field(default_factory=list)  # every sampled token, control tokens and captions included


GenerationEvent = TextEvent | ImageEvent | DoneEvent


class Float32Scores(transformers.LogitsProcessor):
    """Scores in float32 from here on: sampling from bf16 probabilities would be coarse."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.float()


class HookProcessor(transformers.LogitsProcessor):
    """A `LogitsHook` as a transformers logits processor; `token_ids` is the answer's list, read at each call."""

    def __init__(self, hook: LogitsHook, token_ids: list[int]) -> None:
        self.hook = hook
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.hook(self.token_ids, scores[0]).unsqueeze(0)


def logits_processors(
    config: DecodingConfig, *, rules: transformers.LogitsHook | None = None, hook: HookProcessor | None = None
) -> LogitsProcessorList:
    """The steps from raw (1, V) logits to the scores a token is chosen from, in transformers' `generate` order.

    Our hook comes first and the control-token rules after the repetition penalty, so nothing can lift
    their masks; the warpers only ever remove tokens. Steps that would change nothing are left out,
    so greedy decoding without a penalty is the argmax over the masked logits, in the model's dtype.
    """
    processors = LogitsProcessorList()
    if hook is not None:
        processors.append(hook)
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty)))
    if rules is not None:
        processors.append(rules)
    if config.do_sample:
        processors.append(Float32Scores())
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(config.temperature)))
        if config.top_k > 0:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
        if config.min_p > 0.0:
            processors.append(MinPLogitsWarper(config.min_p))
    return processors


def sample_next_token(
    logits: torch.Tensor,
    config: DecodingConfig,
    generator: torch.Generator | None = None,
    processors: LogitsProcessorList | None = None,
    input_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(V,) logits -> (1,) token id: the argmax, or a draw, of the scores `processors` make of them.

    `processors` defaults to `logits_processors(config)`; `input_ids` (1, L) are the tokens a
    repetition penalty looks at (default: none). The draw is in vocabulary order, as transformers
    samples, with `generator` as the random stream.
    """
    processors = logits_processors(config) if processors is None else processors
    if processors:
        if input_ids is None:
            input_ids = torch.zeros((1, 0), dtype=torch.long, device=logits.device)
        logits = processors(input_ids, logits.unsqueeze(0))[0]
    if not config.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


class IncrementalDetokenizer:
    """Token ids in, displayable text pieces out, such that the pieces add up to the full decode.

    The fallback for tokenizers without a `tokenizers` backend; `detokenizer_for` picks
    `StreamDetokenizer` where there is one.

    Decoding one token at a time is wrong for SentencePiece: the decoder drops the word-start
    space of the *first* token of whatever it decodes, and byte-fallback tokens make text only in
    groups. So each step decodes a short window twice, with and without the new tokens, and emits
    the difference; both decodes start at the same token, so the dropped space cancels out (only
    the answer's very first token loses it, as it should). Text ending in an incomplete UTF-8
    sequence (U+FFFD) waits for the next token. The work per token stays constant.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # the window decoded each step starts here
        self._read_offset = 0  # text of tokens before this has been emitted

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often empty for byte pieces)."""
        self.token_ids.append(token_id)
        emitted = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.token_ids[self._prefix_offset :])
        if len(current) <= len(emitted) or current.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return current[len(emitted) :]

    def flush(self) -> str:
        """The text still held back (an incomplete byte sequence at the end), emitted as it stands."""
        if self._read_offset == len(self.token_ids):
            return ""
        emitted = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return current[len(emitted) :]

    @property
    def text(self) -> str:
        return self._decode(self.token_ids)


class StreamDetokenizer:
    """`IncrementalDetokenizer`'s guarantees through `tokenizers`' `DecodeStream`, for fast tokenizers.

    The stream keeps the few tokens a piece needs and decodes each step once, in Rust. It returns
    None while bytes of a character are still missing, and skips special tokens as the full decode
    does. What it holds back at the end is emitted by `flush`, as the full decode has it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._backend = tokenizer.backend_tokenizer
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._emitted_length = 0  # characters of the full decode emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often empty for byte pieces)."""
        self.token_ids.append(token_id)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id) or ""
                self._emitted_length += len(piece)
                return piece
            except Exception:  # the tokenizers bindings raise a bare Exception
                # The stream refuses bytes that cannot complete the character it waits for (a model
                # can sample any byte piece). The full decode shows them as U+FFFD; from here on this
                # segment is decoded whole at each step, as rarely happens.
                self._stream = None
        text = self.text
        if len(text) <= self._emitted_length or text.endswith("\ufffd"):
            return ""
        piece, self._emitted_length = text[self._emitted_length :], len(text)
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete byte sequence at the end), emitted as it stands."""
        rest = self.text[self._emitted_length :]
        self._emitted_length += len(rest)
        self._stream = DecodeStream(skip_special_tokens=True)  # later tokens start a fresh stream, as after a flush
        return rest

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)


def detokenizer_for(tokenizer: PreTrainedTokenizerBase) -> StreamDetokenizer | IncrementalDetokenizer:
    """A `StreamDetokenizer` where the tokenizer has a `tokenizers` backend and its decode adds no clean-up of
    its own (which the stream would not apply), else the `IncrementalDetokenizer`."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None and not getattr(
        tokenizer, "clean_up_tokenization_spaces", False
    ):
        return StreamDetokenizer(tokenizer)
    return IncrementalDetokenizer(tokenizer)


def join_segments(segments: list[str]) -> str:
    """Text segments around images -> turn content with one `<image>` marker between neighbours.

    A marker the model spelt out as text is dropped, so that markers and images always match.
    """
    parts = []
    for index, segment in enumerate(segments):
        text = segment.replace(IMAGE_TOKEN, "").strip()
        if text:
            parts.append(text)
        if index < len(segments) - 1:
            parts.append(IMAGE_TOKEN)
    return " ".join(parts)


def truncate_cache(cache: Any, length: int) -> None:
    """Drop the cache's entries past `length` tokens, in place.

    A negative argument to `crop` counts tokens to remove: transformers 5.24 accepts only that
    form, and older releases read it the same way (they also took a positive target length).
    """
    tokens_to_remove = cache.get_seq_length() - length
    if tokens_to_remove > 0:
        cache.crop(-tokens_to_remove)


@dataclass
class ControlTokens:
    """The ids of the control tokens and the (V,) masks of what may not be sampled in each state."""

    image_token_id: int
    start_token_id: int
    end_token_id: int
    eos_token_id: int
    masks: dict[bool, torch.Tensor]  # in a caption -> (V,) bool

    @property
    def ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.start_token_id, self.end_token_id, self.eos_token_id)

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, vocabulary_size: int, device: torch.device) -> ControlTokens:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        start_token_id = tokenizer.convert_tokens_to_ids(START_TOKEN)
        end_token_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        eos_token_id = tokenizer.eos_token_id
        masks = {}
        for in_caption in (False, True):
            masked = [image_token_id]
            masked += [start_token_id, eos_token_id] if in_caption else [end_token_id]
            mask = torch.zeros(vocabulary_size, dtype=torch.bool)
            mask[masked] = True
            masks[in_caption] = mask.to(device)
        return cls(image_token_id, start_token_id, end_token_id, eos_token_id, masks)


class ControlTokenRules(transformers.LogitsProcessor):
    """The control-token rules of one answer: the masks of its state, and the image limit.

    The answer's decoder sets `in_caption` and `images_made` before each step. The image limit is
    not a mask: `<start>` stays allowed, and `ends_answer` tells whether the token chosen ends the
    answer (see the module docstring).
    """

    def __init__(self, control: ControlTokens, max_images: int) -> None:
        self.control = control
        self.max_images = max_images
        self.in_caption = False
        self.images_made = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.control.masks[self.in_caption], float("-inf"))

    def ends_answer(self, token_id: int) -> bool:
        """Whether `token_id`, chosen in the current state, is a `<start>` past the image budget."""
        return (
            not self.in_caption and token_id == self.control.start_token_id and self.images_made >= self.max_images
        )


def sampling_generator(config: DecodingConfig, device: torch.device) -> torch.Generator | None:
    """The random stream of one answer: seeded by `config.seed` (None: fresh entropy); None when greedy."""
    if not config.do_sample:
        return None
    generator = torch.Generator(device=device)
    if config.seed is None:
        generator.seed()
    else:
        generator.manual_seed(config.seed)
    return generator


# What the model must do next for one answer; `AnswerDecoder` returns one after each call.
@dataclass
class FeedTokens:
    """Feed `token_ids` at positions `position`, `position + 1`, ...; then `advance` with the last logits."""

    token_ids: list[int]
    position: int


@dataclass
class RenderCaption:
    """Render `caption` with `seed`; then `image_ready` with the image (None: no image for this answer)."""

    caption: str
    seed: int | None


@dataclass
class FeedImage:
    """Roll the cache back to `position` (dropping `<start>` and the caption) and feed the image's Q embeddings
    at positions `position` .. `position + Q - 1`; then `advance` with the logits of the last one."""

    image: Image.Image
    position: int


@dataclass
class Finished:
    """The answer is complete; `done` is also the last of its events."""

    done: DoneEvent


DecodeAction = FeedTokens | RenderCaption | FeedImage | Finished


class AnswerDecoder:
    """The decoding rules of one assistant turn, apart from the model: logits in, the next action out.

    It samples (the logits hook, the control-token rules and the warpers, as one transformers
    `LogitsProcessorList`; its own random stream), tracks captions, the token budget and the
    context length, and collects the answer's events. The single-answer
    `InterleavedGenerator` and the batched decoder both drive it, so both follow the same rules
    by construction; they differ only in how they run the model and hold the cache.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        control: ControlTokens,
        config: DecodingConfig,
        *,
        prompt_length: int,
        max_length: int,
        num_query_tokens: int,
        device: torch.device,
        logits_processor: LogitsHook | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.control = control
        self.config = config
        self.max_length = max_length
        self.num_query_tokens = num_query_tokens
        self.generator = sampling_generator(config, device)
        self.length = prompt_length  # tokens in the context == position of the next token
        self.token_ids: list[int] = []
        # The answer's text and caption tokens, on the device, for the repetition penalty: control
        # tokens are left out, or a penalty would make a second image or caption end less likely.
        self.penalized_ids = torch.zeros((1, 0), dtype=torch.long, device=device)
        self.rules = ControlTokenRules(control, config.max_images)
        hook = None if logits_processor is None else HookProcessor(logits_processor, self.token_ids)
        self.processors = logits_processors(config, rules=self.rules, hook=hook)
        self.segments: list[str] = []  # finished text segments; images sit between neighbours
        self.images: list[Image.Image | None] = []
        self.captions: list[str] = []
        self.detokenizer = detokenizer_for(tokenizer)
        self.caption_start: int | None = None  # context length before `<start>` while a caption is decoded
        self.caption_ids: list[int] = []
        self.finish_reason = FINISH_LENGTH
        self.finished = False
        self._events: list[GenerationEvent] = []
        self._unfed: list[int] = []  # a caption token sampled but not fed when the caption was cut at its cap
        self._closing = False  # the budget ran out inside a caption: its image is the answer's last event
        self._pending_caption: str | None = None

    def take_events(self) -> list[GenerationEvent]:
        """The events since the last call, in order."""
        events, self._events = self._events, []
        return events

    def _text(self, piece: str) -> None:
        if piece:
            self._events.append(TextEvent(piece))

    def _feed(self, token_ids: list[int]) -> FeedTokens:
        action = FeedTokens(token_ids, self.length)
        self.length += len(token_ids)
        return action

    def advance(self, logits: torch.Tensor) -> DecodeAction:
        """(V,) logits of the last fed position -> sample the next token; what to do next."""
        config = self.config
        if not (len(self.token_ids) < config.max_new_tokens and self.length < self.max_length):
            return self._finish()
        in_caption = self.caption_start is not None
        self.rules.in_caption, self.rules.images_made = in_caption, len(self.images)
        token = sample_next_token(logits, config, self.generator, self.processors, self.penalized_ids)  # (1,)
        token_id = int(token)  # the one host sync per step: control flow and text need the id
        control = self.control
        if self.rules.ends_answer(token_id):
            self.finish_reason = FINISH_IMAGE_LIMIT
            return self._finish()
        self.token_ids.append(token_id)
        if config.repetition_penalty != 1.0 and token_id not in control.ids:
            self.penalized_ids = torch.cat([self.penalized_ids, token.view(1, 1)], dim=1)

        if not in_caption:
            if token_id == control.eos_token_id:
                self.finish_reason = FINISH_STOP
                return self._finish()
            if token_id == control.start_token_id:
                self._text(self.detokenizer.flush())
                self.segments.append(self.detokenizer.text)
                self.caption_start, self.caption_ids = self.length, []
            else:
                self._text(self.detokenizer.push(token_id))
            return self._feed([token_id])

        if token_id != control.end_token_id:
            self.caption_ids.append(token_id)
            if len(self.caption_ids) < config.max_caption_tokens:
                return self._feed([token_id])
            self._unfed = [token_id]  # the caption is closed as if `<end>` followed
        return self._close_caption()

    def _close_caption(self) -> RenderCaption:
        caption = self.tokenizer.decode(self.caption_ids, skip_special_tokens=True).strip()
        seed = None if self.config.seed is None else self.config.seed + len(self.images)
        self._pending_caption = caption
        return RenderCaption(caption, seed)

    def image_ready(self, image: Image.Image | None) -> DecodeAction:
        """The rendered image of the caption just closed (None: no image; the caption stays as text)."""
        caption, self._pending_caption = self._pending_caption, None
        if caption is None:
            raise RuntimeError("image_ready called without a caption to render")
        self.images.append(image)
        self.captions.append(caption)
        self._events.append(ImageEvent(image, caption))
        position, self.caption_start = self.caption_start, None
        self.detokenizer = detokenizer_for(self.tokenizer)
        unfed, self._unfed = self._unfed, []
        if self._closing:
            return self._done()
        if len(self.token_ids) >= self.config.max_new_tokens:
            return self._finish()  # nothing would read the context again
        if image is None:  # the caption and its `<end>` stay in the context as plain tokens
            return self._feed([*unfed, self.control.end_token_id])
        if position + self.num_query_tokens > self.max_length:
            return self._finish()
        self.length = position + self.num_query_tokens
        return FeedImage(image, position)

    def _finish(self) -> DecodeAction:
        if self.caption_start is not None:  # the budget ran out inside a caption: render what there is
            self._closing = True
            return self._close_caption()
        self._text(self.detokenizer.flush())
        self.segments.append(self.detokenizer.text)
        return self._done()

    def _done(self) -> Finished:
        while len(self.segments) < len(self.images) + 1:  # an answer ending with an image has an empty last segment
            self.segments.append("")
        turn = Turn("assistant", join_segments(self.segments), self.images, self.captions)
        done = DoneEvent(turn, self.finish_reason, self.token_ids)
        self._events.append(done)
        self.finished = True
        return Finished(done)


class InterleavedGenerator:
    """Answers conversations with interleaved text and images, one turn at a time (batch size 1).

    Put the model in eval mode first (the Q-Former has dropout). The prompt may hold at most
    `max_length` tokens (default: the language model's `max_position_embeddings`), and the answer
    stops when the context reaches it.
    """

    def __init__(
        self,
        model: MIMModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        image_decoder: ImageDecoder | None = None,
        *,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_decoder = image_decoder
        language_config = model.language_model.config
        self.max_length = max_length or getattr(language_config, "max_position_embeddings", 4096)
        self.encoder = ConversationEncoder(tokenizer, model.num_query_tokens, self.max_length)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.start_token_id = tokenizer.convert_tokens_to_ids(START_TOKEN)
        self.end_token_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        self.eos_token_id = tokenizer.eos_token_id
        vocabulary_size = model.language_model.get_output_embeddings().weight.shape[0]
        self.control = ControlTokens.build(tokenizer, vocabulary_size, model.device)

    @classmethod
    def from_bundle(cls, bundle: Any, image_decoder: ImageDecoder | None = None, **kwargs: Any) -> InterleavedGenerator:
        """From a `textbind.model.builder.ModelBundle`."""
        return cls(bundle.model, bundle.tokenizer, bundle.image_processor, image_decoder, **kwargs)

    def _forward(
        self, input_ids: torch.Tensor, start: int, cache: Any, image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Feed (1, L) tokens at positions start .. start+L-1 over `cache`; (V,) logits of the last one."""
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, L)
        output = self.model(
            input_ids=input_ids,
            position_ids=positions,
            pixel_values=pixel_values,
            image_embeds=image_embeds,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[0, -1], output.past_key_values

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> (1, Q, D) embeddings, as the vision encoder + Q-Former + projector see it."""
        pixel_values = pixel_values_for([image], self.image_processor, "generated image")  # (1, 3, H, W)
        return self.model.encode_images(pixel_values.to(self.model.device))

    def render(self, caption: str, seed: int | None) -> Image.Image | None:
        if self.image_decoder is None:
            return None
        logger.debug("rendering caption %r (seed=%s)", caption, seed)
        image = self.image_decoder(caption, seed=seed)
        return image.convert("RGB")

    @torch.inference_mode()  # on a generator function: active only while it runs, not between events
    def stream(
        self,
        conversation: Conversation,
        config: DecodingConfig | None = None,
        *,
        logits_processor: LogitsHook | None = None,
    ) -> Iterator[GenerationEvent]:
        """Generate the assistant turn answering `conversation` (which ends with a user turn), as events.

        Raises DataError when markers and images disagree, the prompt is longer than `max_length`, or
        an image cannot be read (or was never rendered: None in an earlier assistant turn). Files are
        checked as they are read; `validate_conversation` gives fuller messages for stored records.
        """
        config = (config or DecodingConfig()).validate()
        if self.model.training:
            logger.warning("generating with a model in training mode (dropout is active); call model.eval()")
        device = self.model.device
        prompt_ids, pixel_values = self.prepare_prompt(conversation)
        answer = self.answer_decoder(config, len(prompt_ids), logits_processor)
        prompt = torch.tensor([prompt_ids], device=device)  # (1, L)
        logits, cache = self._forward(prompt, 0, None, pixel_values=pixel_values)
        action = answer.advance(logits)
        while True:
            yield from answer.take_events()
            if isinstance(action, Finished):
                return
            if isinstance(action, RenderCaption):
                action = answer.image_ready(self.render(action.caption, action.seed))
                continue
            if isinstance(action, FeedTokens):
                token_ids = torch.tensor([action.token_ids], device=device)  # (1, n)
                logits, cache = self._forward(token_ids, action.position, cache)
            else:
                logits, cache, _ = self._feed_image(action.image, action.position, cache)
            action = answer.advance(logits)

    def prepare_prompt(self, conversation: Conversation) -> tuple[list[int], torch.Tensor | None]:
        """The prompt's token ids and its images' (N, 3, H, W) pixels on the model's device (None: no image).

        Raises DataError as `stream` documents.
        """
        if any(image is None for turn in conversation.turns for image in turn.image_list):
            raise DataError(
                f"{conversation.source}: an earlier assistant image was never rendered (None in image_list); "
                "render it or remove its marker before generating the next turn"
            )
        encoded = self.encoder.encode(conversation, for_inference=True)
        pixel_values = None
        if encoded.images:
            pixel_values = pixel_values_for(encoded.images, self.image_processor, conversation.source)
            pixel_values = pixel_values.to(self.model.device)
        return list(encoded.input_ids), pixel_values

    def answer_decoder(
        self, config: DecodingConfig, prompt_length: int, logits_processor: LogitsHook | None = None
    ) -> AnswerDecoder:
        """The decoding rules of one answer to a prompt of `prompt_length` tokens."""
        return AnswerDecoder(
            self.tokenizer, self.control, config, prompt_length=prompt_length, max_length=self.max_length,
            num_query_tokens=self.model.num_query_tokens, device=self.model.device,
            logits_processor=logits_processor,
        )

    def _feed_image(self, image: Image.Image, position: int, cache: Any) -> tuple[torch.Tensor, Any, int]:
        """Roll the cache back to `position` (dropping `<start>` and the caption) and feed the image there."""
        image_embeds = self.encode_image(image)  # (1, Q, D)
        truncate_cache(cache, position)
        num_query_tokens = image_embeds.shape[1]
        image_ids = torch.full((1, num_query_tokens), self.image_token_id, device=self.model.device)  # (1, Q)
        logits, cache = self._forward(image_ids, position, cache, image_embeds=image_embeds)
        return logits, cache, position + num_query_tokens

    def generate_turn(
        self,
        conversation: Conversation,
        config: DecodingConfig | None = None,
        *,
        logits_processor: LogitsHook | None = None,
    ) -> Turn:
        """The finished answer: `<image>` markers in its content, PIL images (or None) and captions."""
        return self.generate(conversation, config, logits_processor=logits_processor).turn

    def generate(
        self,
        conversation: Conversation,
        config: DecodingConfig | None = None,
        *,
        logits_processor: LogitsHook | None = None,
    ) -> DoneEvent:
        """Run `stream` to the end; the final event, with the finish reason and the sampled token ids."""
        for event in self.stream(conversation, config, logits_processor=logits_processor):
            if isinstance(event, DoneEvent):
                return event
        raise RuntimeError("generation ended without a DoneEvent")  # unreachable: stream always ends with one
