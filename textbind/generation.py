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
from PIL import Image
from transformers import PreTrainedTokenizerBase

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.data.samples import pixel_values_for
from textbind.data.sequence import ConversationEncoder
from textbind.image_decoder import ImageDecoder
from textbind.model.mim import MIMModel

logger = logging.getLogger(__name__)

# (token ids sampled so far in this answer, raw next-token logits (V,)) -> logits (V,). Applied
# before the control-token masks, so the rules above always hold. Tests use it to record logits
# and to force a token schedule; it can also carry constrained decoding or repetition penalties.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

FINISH_STOP = "stop"  # the model wrote </s>
FINISH_LENGTH = "length"  # max_new_tokens or the model's context length ran out
FINISH_IMAGE_LIMIT = "image_limit"  # the model began an image after max_images images (see above)


@dataclass
class GenerationConfig:
    """How one assistant turn is decoded."""

    max_new_tokens: int = 512  # every sampled token counts, caption tokens included
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens that cover this probability
    seed: int | None = 0  # sampling stream; image k of the answer is rendered with seed + k; None: random
    max_images: int = 4  # images per answer; a further `<start>` ends the answer ("image_limit")
    max_caption_tokens: int = 77  # a caption longer than this is closed as if `<end>` followed (CLIP reads 77)

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
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


def sample_next_token(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(V,) logits -> (1,) token id: argmax, or a draw from the temperature-scaled top-p distribution."""
    if not config.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float() / config.temperature  # sample in float32: bf16 probabilities are coarse
    if config.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probabilities = sorted_scores.softmax(dim=-1)
        # Drop a token once the more likely ones already cover top_p; the most likely one always stays.
        covered_before = probabilities.cumsum(dim=-1) - probabilities
        sorted_scores = sorted_scores.masked_fill(covered_before >= config.top_p, float("-inf"))
        choice = torch.multinomial(sorted_scores.softmax(dim=-1), 1, generator=generator)
        return order[choice]
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)


class IncrementalDetokenizer:
    """Token ids in, displayable text pieces out, such that the pieces add up to the full decode.

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

    @classmethod
    def from_bundle(cls, bundle: Any, image_decoder: ImageDecoder | None = None, **kwargs: Any) -> InterleavedGenerator:
        """From a `textbind.model.builder.ModelBundle`."""
        return cls(bundle.model, bundle.tokenizer, bundle.image_processor, image_decoder, **kwargs)

    def _control_masks(self) -> dict[bool, torch.Tensor]:
        """in a caption -> (V,) bool mask of the tokens that may not be sampled."""
        vocabulary_size = self.model.language_model.get_output_embeddings().weight.shape[0]
        masks = {}
        for in_caption in (False, True):
            masked = [self.image_token_id]
            masked += [self.start_token_id, self.eos_token_id] if in_caption else [self.end_token_id]
            mask = torch.zeros(vocabulary_size, dtype=torch.bool)
            mask[masked] = True
            masks[in_caption] = mask.to(self.model.device)
        return masks

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
        image = self.image_decoder(caption, seed=seed)
        return image.convert("RGB")

    @torch.inference_mode()  # on a generator function: active only while it runs, not between events
    def stream(
        self,
        conversation: Conversation,
        config: GenerationConfig | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,
    ) -> Iterator[GenerationEvent]:
        """Generate the assistant turn answering `conversation` (which ends with a user turn), as events.

        Raises DataError when markers and images disagree, the prompt is longer than `max_length`, or
        an image cannot be read (or was never rendered: None in an earlier assistant turn). Files are
        checked as they are read; `validate_conversation` gives fuller messages for stored records.
        """
        config = (config or GenerationConfig()).validate()
        model = self.model
        if model.training:
            logger.warning("generating with a model in training mode (dropout is active); call model.eval()")
        device = model.device
        generator = None
        if config.do_sample:
            generator = torch.Generator(device=device)
            if config.seed is None:
                generator.seed()
            else:
                generator.manual_seed(config.seed)

        if any(image is None for turn in conversation.turns for image in turn.image_list):
            raise DataError(
                f"{conversation.source}: an earlier assistant image was never rendered (None in image_list); "
                "render it or remove its marker before generating the next turn"
            )
        encoded = self.encoder.encode(conversation, for_inference=True)
        masks = self._control_masks()
        pixel_values = None
        if encoded.images:
            pixel_values = pixel_values_for(encoded.images, self.image_processor, conversation.source).to(device)
        prompt_ids = torch.tensor([encoded.input_ids], device=device)  # (1, L)
        logits, cache = self._forward(prompt_ids, 0, None, pixel_values=pixel_values)
        length = prompt_ids.shape[1]  # tokens in the cache == position of the next token

        token_ids: list[int] = []
        segments: list[str] = []  # finished text segments; images sit between neighbours
        images: list[Image.Image | None] = []
        captions: list[str] = []
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        caption_start: int | None = None  # cache length before `<start>` while a caption is decoded
        caption_ids: list[int] = []
        finish_reason = FINISH_LENGTH

        while len(token_ids) < config.max_new_tokens and length < self.max_length:
            if logits_processor is not None:
                logits = logits_processor(token_ids, logits)
            in_caption = caption_start is not None
            # `<start>` stays allowed outside a caption even with the image budget spent: see the module docstring.
            mask = masks[in_caption]
            token = sample_next_token(logits.masked_fill(mask, float("-inf")), config, generator)  # (1,)
            token_id = int(token)  # the one host sync per step: control flow and text need the id
            if not in_caption and token_id == self.start_token_id and len(images) >= config.max_images:
                finish_reason = FINISH_IMAGE_LIMIT
                break
            token_ids.append(token_id)

            if not in_caption:
                if token_id == self.eos_token_id:
                    finish_reason = FINISH_STOP
                    break
                if token_id == self.start_token_id:
                    piece = detokenizer.flush()
                    if piece:
                        yield TextEvent(piece)
                    segments.append(detokenizer.text)
                    caption_start, caption_ids = length, []
                else:
                    piece = detokenizer.push(token_id)
                    if piece:
                        yield TextEvent(piece)
                logits, cache = self._forward(token.view(1, 1), length, cache)
                length += 1
                continue

            if token_id != self.end_token_id:
                caption_ids.append(token_id)
                logits, cache = self._forward(token.view(1, 1), length, cache)
                length += 1
                if len(caption_ids) < config.max_caption_tokens:
                    continue
            # The caption is complete: render it and put the image where it began.
            image, caption = self._close_caption(caption_ids, len(images), config)
            images.append(image)
            captions.append(caption)
            yield ImageEvent(image, caption)
            position, caption_start = caption_start, None
            detokenizer = IncrementalDetokenizer(self.tokenizer)
            if len(token_ids) >= config.max_new_tokens:
                break  # nothing would read the context again
            if image is None:
                end = torch.tensor([[self.end_token_id]], device=device)  # (1, 1)
                logits, cache = self._forward(end, length, cache)
                length += 1
            elif position + model.num_query_tokens <= self.max_length:
                logits, cache, length = self._feed_image(image, position, cache)
            else:
                break

        if caption_start is not None:  # the token budget ran out inside a caption: render what there is
            image, caption = self._close_caption(caption_ids, len(images), config)
            images.append(image)
            captions.append(caption)
            yield ImageEvent(image, caption)
        else:
            piece = detokenizer.flush()
            if piece:
                yield TextEvent(piece)
            segments.append(detokenizer.text)
        while len(segments) < len(images) + 1:  # an answer ending with an image has an empty last segment
            segments.append("")
        turn = Turn("assistant", join_segments(segments), images, captions)
        yield DoneEvent(turn, finish_reason, token_ids)

    def _close_caption(
        self, caption_ids: list[int], image_index: int, config: GenerationConfig
    ) -> tuple[Image.Image | None, str]:
        caption = self.tokenizer.decode(caption_ids, skip_special_tokens=True).strip()
        seed = None if config.seed is None else config.seed + image_index
        logger.debug("rendering caption %r (seed=%s)", caption, seed)
        return self.render(caption, seed), caption

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
        config: GenerationConfig | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,
    ) -> Turn:
        """The finished answer: `<image>` markers in its content, PIL images (or None) and captions."""
        return self.generate(conversation, config, logits_processor=logits_processor).turn

    def generate(
        self,
        conversation: Conversation,
        config: GenerationConfig | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,
    ) -> DoneEvent:
        """Run `stream` to the end; the final event, with the finish reason and the sampled token ids."""
        for event in self.stream(conversation, config, logits_processor=logits_processor):
            if isinstance(event, DoneEvent):
                return event
        raise RuntimeError("generation ended without a DoneEvent")  # unreachable: stream always ends with one
