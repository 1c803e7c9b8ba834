"""Tests for interleaved generation: KV-cache exactness around rendered images, control tokens, sampling."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.config import ModelConfig
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.data.samples import pixel_values_for
from textbind.data.sequence import ConversationEncoder
from textbind.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecodingConfig,
    DoneEvent,
    ImageEvent,
    IncrementalDetokenizer,
    InterleavedGenerator,
    StreamDetokenizer,
    TextEvent,
    detokenizer_for,
    join_segments,
    logits_processors,
    sample_next_token,
)
from textbind.image_decoder import ImageDecoder
from textbind.model.builder import ModelBundle

from helpers import conversation, one_output_image, overfit

TRAINED_ANSWER = "A red block. Here is a green one: <image> Do you like it?"
TRAINED_CAPTION = "a green block"


class RecordingDecoder:
    """An image decoder that returns a fixed image and records every call."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.calls: list[tuple[str, int | None]] = []

    def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image:
        self.calls.append((caption, seed))
        return self.image.copy()


_OVERFIT_BUNDLES: dict[tuple[str, str, int], ModelBundle] = {}


def overfit_bundle(model_config: ModelConfig, image_dir: str, steps: int = 60) -> ModelBundle:
    """The tiny model trained (all modules, Adam) on `one_output_image` until it reproduces it greedily.

    Kept per process, so that test files sharing it train once per session (about a second).
    """
    key = (model_config.language_model, image_dir, steps)
    if key not in _OVERFIT_BUNDLES:
        _OVERFIT_BUNDLES[key] = _overfit(model_config, image_dir, steps)
    return _OVERFIT_BUNDLES[key]


def _overfit(model_config: ModelConfig, image_dir: str, steps: int) -> ModelBundle:
    return overfit(model_config, [one_output_image(image_dir)], steps)


def prompt_of(image_dir) -> object:
    """The trained conversation's user turn: the prompt the overfit model answers."""
    return conversation(("user", "What is this? <image>", ["0.png"]), image_dir=image_dir)


@pytest.fixture(scope="module")
def trained(model_config, image_dir) -> ModelBundle:
    return overfit_bundle(model_config, str(image_dir))


@pytest.fixture(scope="module")
def green_image(image_dir) -> Image.Image:
    """The image the trained conversation shows after its caption."""
    return Image.open(image_dir / "1.png").convert("RGB")


def special_ids(tokenizer) -> tuple[int, int, int]:
    return tuple(tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_TOKEN, START_TOKEN, END_TOKEN))


class LogitsRecorder:
    """A logits processor that keeps, for each step, the tokens sampled before it and the raw logits."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.steps.append((list(token_ids), logits.clone()))
        return logits


def forcing(schedule: list[int]):
    """A logits processor that makes token `schedule[k]` the favourite at step k (if it is allowed)."""

    def processor(token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(token_ids) < len(schedule):
            logits = logits.clone()
            logits[schedule[len(token_ids)]] = logits.max() + 1e4
        return logits

    return processor


# --- The full-recompute reference ---------------------------------------------------------------------


def full_context(
    prompt_ids: list[int], sampled: list[int], tokenizer, num_query_tokens: int, with_images: bool
) -> tuple[list[int], int]:
    """The context the model should condition on after `sampled`, without any cache: the prompt, the text,
    each finished caption replaced by its image's Q tokens (or kept as text without a decoder), and the
    caption being written. Returns (token ids, number of generated images in it)."""
    image_id, start_id, end_id = special_ids(tokenizer)
    context = list(prompt_ids)
    caption: list[int] | None = None
    images = 0
    for token in sampled:
        if caption is None:
            if token == start_id:
                caption = [start_id]
            else:
                context.append(token)
        elif token == end_id:
            context += [image_id] * num_query_tokens if with_images else caption + [end_id]
            images += 1
            caption = None
        else:
            caption.append(token)
    return context + (caption or []), images


def assert_cached_logits_match_recompute(
    bundle: ModelBundle, conv, recorder: LogitsRecorder, generated_images: list[Image.Image], atol: float = 1e-5,
    rtol: float = 0.0,
) -> None:
    """The logits each step saw through the cache equal one forward over the whole context, no cache."""
    model, tokenizer = bundle.model, bundle.tokenizer
    device = model.device
    encoder = ConversationEncoder(tokenizer, model.num_query_tokens, max_length=4096)
    encoded = encoder.encode(conv, for_inference=True)
    with torch.no_grad():
        prompt_pixels = pixel_values_for(encoded.images, bundle.image_processor, "prompt").to(device)
        prompt_embeds = model.encode_images(prompt_pixels)  # (N, Q, D)
        generated_embeds = [
            model.encode_images(pixel_values_for([image], bundle.image_processor, "generated").to(device))
            for image in generated_images
        ]
        for step, (sampled, cached_logits) in enumerate(recorder.steps):
            context, images = full_context(
                encoded.input_ids, sampled, tokenizer, model.num_query_tokens, bool(generated_images)
            )
            image_embeds = torch.cat([prompt_embeds, *generated_embeds[:images]])  # (N, Q, D)
            reference = model(input_ids=torch.tensor([context], device=device), image_embeds=image_embeds).logits[0, -1]
            torch.testing.assert_close(
                cached_logits, reference, atol=atol, rtol=rtol, msg=lambda message, step=step: f"step {step}: {message}"
            )


# --- Tests on the model trained on one conversation -----------------------------------------------------


def test_trained_model_answers_with_its_image_fed_back(trained, image_dir, green_image) -> None:
    decoder = RecordingDecoder(green_image)
    assert isinstance(decoder, ImageDecoder)
    generator = InterleavedGenerator.from_bundle(trained, decoder)
    done = generator.generate(prompt_of(image_dir), DecodingConfig(max_new_tokens=60, seed=7))
    assert done.finish_reason == FINISH_STOP
    assert done.turn.role == "assistant"
    assert done.turn.content == TRAINED_ANSWER
    assert done.turn.caption_list == [TRAINED_CAPTION]
    assert len(done.turn.image_list) == done.turn.content.count(IMAGE_TOKEN) == 1
    assert done.turn.image_list[0].tobytes() == green_image.tobytes()
    assert decoder.calls == [(TRAINED_CAPTION, 7)]  # once, with the caption text and the derived seed


@pytest.mark.parametrize("with_decoder", [True, False], ids=["image-fed-back", "caption-kept-as-text"])
def test_cached_logits_equal_a_full_recompute_at_every_step(trained, image_dir, green_image, with_decoder) -> None:
    decoder = RecordingDecoder(green_image) if with_decoder else None
    generator = InterleavedGenerator.from_bundle(trained, decoder)
    recorder = LogitsRecorder()
    conv = prompt_of(image_dir)
    done = generator.generate(conv, DecodingConfig(max_new_tokens=40), logits_processor=recorder)
    _, start_id, end_id = special_ids(trained.tokenizer)
    # The steps cover text, the caption branch, and text after the image (or after the kept caption).
    assert start_id in done.token_ids and end_id in done.token_ids
    assert done.token_ids.index(end_id) < len(recorder.steps) - 2
    generated = [image for image in done.turn.image_list if image is not None]
    assert len(generated) == (1 if with_decoder else 0) and len(done.turn.image_list) >= 1
    assert_cached_logits_match_recompute(trained, conv, recorder, generated)


def test_events_stream_text_then_image_then_text(trained, image_dir, green_image) -> None:
    generator = InterleavedGenerator.from_bundle(trained, RecordingDecoder(green_image))
    events = list(generator.stream(prompt_of(image_dir), DecodingConfig(max_new_tokens=60)))
    assert isinstance(events[-1], DoneEvent)
    assert sum(isinstance(event, DoneEvent) for event in events) == 1
    kinds = "".join("I" if isinstance(event, ImageEvent) else "T" for event in events[:-1])
    assert kinds.count("I") == 1 and kinds.startswith("T") and kinds.endswith("T")
    image_at = kinds.index("I")
    before = "".join(event.text for event in events[:image_at])
    after = "".join(event.text for event in events[image_at + 1 : -1] if isinstance(event, TextEvent))
    assert before == "A red block. Here is a green one:"
    assert after == "Do you like it?"
    assert events[image_at].caption == TRAINED_CAPTION


def test_without_a_decoder_the_caption_is_reported_without_pixels(trained, image_dir) -> None:
    done = InterleavedGenerator.from_bundle(trained).generate(prompt_of(image_dir), DecodingConfig(max_new_tokens=30))
    assert done.turn.caption_list[0] == TRAINED_CAPTION
    assert done.turn.image_list[0] is None
    assert done.turn.content.startswith("A red block. Here is a green one: <image>")


def test_max_images_zero_suppresses_start(trained, image_dir, green_image) -> None:
    decoder = RecordingDecoder(green_image)
    done = InterleavedGenerator.from_bundle(trained, decoder).generate(
        prompt_of(image_dir), DecodingConfig(max_new_tokens=30, max_images=0)
    )
    _, start_id, _ = special_ids(trained.tokenizer)
    assert start_id not in done.token_ids
    assert decoder.calls == [] and done.turn.image_list == [] and IMAGE_TOKEN not in done.turn.content



def test_the_answer_is_the_training_sequence_and_can_be_fed_back(trained, image_dir, green_image) -> None:
    generator = InterleavedGenerator.from_bundle(trained, RecordingDecoder(green_image))
    prompt = prompt_of(image_dir)
    done = generator.generate(prompt, DecodingConfig(max_new_tokens=60))
    history = Conversation([*prompt.turns, done.turn], image_dir=str(image_dir))
    # What generation left in the context is the main sequence training builds from the finished turn.
    encoder = ConversationEncoder(trained.tokenizer, trained.model.num_query_tokens, max_length=768)
    training = encoder.encode(history)
    prompt_ids = encoder.encode(prompt, for_inference=True).input_ids
    context, _ = full_context(prompt_ids, done.token_ids, trained.tokenizer, trained.model.num_query_tokens, True)
    assert context == training.input_ids[: training.main_length]

    follow_up = Conversation([*history.turns, Turn("user", "Make it blue.")], image_dir=str(image_dir))
    assert generator.generate(follow_up, DecodingConfig(max_new_tokens=3)).token_ids
    unrendered = InterleavedGenerator.from_bundle(trained).generate_turn(prompt, DecodingConfig(max_new_tokens=30))
    with pytest.raises(DataError, match="never rendered"):
        generator.generate(Conversation([*prompt.turns, unrendered, Turn("user", "More.")], image_dir=str(image_dir)))

@pytest.fixture(scope="module")
def tiny_sdxl_decoder(tmp_path_factory):
    from textbind.image_decoder import SDXLDecoder
    from textbind.testing.tiny_sdxl import build_tiny_sdxl

    base, refiner = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), seed=0)
    return SDXLDecoder.from_pretrained(base, refiner, num_inference_steps=2, high_noise_frac=0.5)


def test_tiny_sdxl_base_and_refiner_render_inside_generation(trained, image_dir, tiny_sdxl_decoder) -> None:
    generator = InterleavedGenerator.from_bundle(trained, tiny_sdxl_decoder)
    recorder = LogitsRecorder()
    conv = prompt_of(image_dir)
    done = generator.generate(conv, DecodingConfig(max_new_tokens=24), logits_processor=recorder)
    assert done.turn.caption_list == [TRAINED_CAPTION]
    (image,) = done.turn.image_list
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"
    assert_cached_logits_match_recompute(trained, conv, recorder, [image])


# --- Control tokens, forced on the random tiny model ----------------------------------------------------


def schedule_of(bundle: ModelBundle, *pieces: str | int) -> list[int]:
    """Token ids from text pieces (tokenised as captions are) and raw ids."""
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens)
    ids: list[int] = []
    for piece in pieces:
        ids += [piece] if isinstance(piece, int) else encoder.text_ids(piece)
    return ids


def test_decoder_is_called_once_per_caption_and_max_images_is_honoured(bundle, image_dir, green_image) -> None:
    image_id, start, end = special_ids(bundle.tokenizer)
    eos = bundle.tokenizer.eos_token_id
    schedule = schedule_of(bundle, "Here", start, "a red block", end, "and", start, "blue", end,
                           start, "green", end, "bye", eos)
    decoder = RecordingDecoder(green_image)
    done = InterleavedGenerator.from_bundle(bundle, decoder).generate(
        conversation(("user", "Draw three blocks.")),
        DecodingConfig(max_new_tokens=len(schedule) + 5, max_images=2, seed=10),
        logits_processor=forcing(schedule),
    )
    assert decoder.calls == [("a red block", 10), ("blue", 11)]
    assert done.turn.caption_list == ["a red block", "blue"]
    assert done.turn.content.count(IMAGE_TOKEN) == len(done.turn.image_list) == 2
    assert done.turn.content.startswith("Here <image> and <image>")
    assert done.token_ids.count(start) == 2  # the third <start> was masked
    assert image_id not in done.token_ids


def test_long_captions_are_capped_and_budget_ends_inside_a_caption(bundle, green_image) -> None:
    _, start, _ = special_ids(bundle.tokenizer)
    words = schedule_of(bundle, "a small red circle on the left")
    schedule = [start, *words, *words]  # longer than the budget: every token is forced
    assert len(schedule) > 12
    decoder = RecordingDecoder(green_image)
    generator = InterleavedGenerator.from_bundle(bundle, decoder)
    prompt = conversation(("user", "Draw."))
    done = generator.generate(
        prompt, DecodingConfig(max_new_tokens=12, max_caption_tokens=3), logits_processor=forcing(schedule)
    )
    assert len(decoder.calls) == 1
    assert decoder.calls[0][0] == bundle.tokenizer.decode(words[:3]).strip()
    assert done.token_ids[:4] == [start, *words[:3]]
    assert done.finish_reason == FINISH_LENGTH and len(done.token_ids) == 12

    decoder.calls.clear()
    done = generator.generate(
        prompt, DecodingConfig(max_new_tokens=4, max_caption_tokens=20), logits_processor=forcing([start, *words])
    )
    assert decoder.calls == [(bundle.tokenizer.decode(words[:3]).strip(), 0)]  # rendered as far as it got
    assert done.turn.content == IMAGE_TOKEN and done.finish_reason == FINISH_LENGTH


def test_forced_images_keep_the_cache_exact(bundle, image_dir, green_image) -> None:
    _, start, end = special_ids(bundle.tokenizer)
    schedule = schedule_of(bundle, "Look", start, "a red block", end, start, "blue", end, "ok")
    recorder = LogitsRecorder()
    forced = forcing(schedule)
    conv = conversation(("user", "Compare <image> and <image>", ["0.png", "2.png"]), image_dir=image_dir)
    generator = InterleavedGenerator.from_bundle(bundle, RecordingDecoder(green_image))
    done = generator.generate(
        conv,
        DecodingConfig(max_new_tokens=len(schedule) + 3),
        logits_processor=lambda token_ids, logits: forced(token_ids, recorder(token_ids, logits)),
    )
    assert done.token_ids[: len(schedule)] == schedule
    assert_cached_logits_match_recompute(bundle, conv, recorder, done.turn.image_list)


# --- Sampling and determinism ---------------------------------------------------------------------------


def test_greedy_is_deterministic(bundle) -> None:
    generator = InterleavedGenerator.from_bundle(bundle)
    prompt = conversation(("user", "Describe a dog on a beach."))
    config = DecodingConfig(max_new_tokens=16)
    assert generator.generate(prompt, config).token_ids == generator.generate(prompt, config).token_ids


def test_sampling_is_reproducible_with_a_seed(bundle) -> None:
    generator = InterleavedGenerator.from_bundle(bundle)
    prompt = conversation(("user", "Describe a dog on a beach."))
    config = DecodingConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.95, seed=3)
    first = generator.generate(prompt, config).token_ids
    assert generator.generate(prompt, config).token_ids == first
    assert generator.generate(prompt, replace(config, seed=4)).token_ids != first
    greedy = generator.generate(prompt, replace(config, do_sample=False)).token_ids
    assert greedy != first


def test_top_p_and_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)
    generator = torch.Generator().manual_seed(0)
    nucleus = DecodingConfig(do_sample=True, top_p=0.5)  # the first token alone covers 0.64
    assert {int(sample_next_token(logits, nucleus, generator)) for _ in range(50)} == {0}
    two = DecodingConfig(do_sample=True, top_p=0.8)  # the first two cover 0.87
    assert {int(sample_next_token(logits, two, generator)) for _ in range(200)} == {0, 1}
    hot = DecodingConfig(do_sample=True, temperature=100.0)
    assert {int(sample_next_token(logits, hot, generator)) for _ in range(200)} == {0, 1, 2, 3}
    assert int(sample_next_token(logits, DecodingConfig())) == 0
    with pytest.raises(ValueError):
        DecodingConfig(top_p=0.0).validate()


def test_top_p_keeps_the_tokens_it_kept_before_and_draws_in_vocabulary_order() -> None:
    """transformers' TopPLogitsWarper keeps the same nucleus as the sorted-cumsum rule used before (the most likely
    tokens whose predecessors cover less than top_p). The draw now runs over the vocabulary in its own order, as
    transformers samples, not over the sorted scores: a seed gives other top-p answers than before this change
    (plain temperature sampling draws exactly as before). Same seed, same answer still holds."""
    torch.manual_seed(0)
    for top_p in (0.3, 0.5, 0.8, 0.95):
        for _ in range(20):
            logits = torch.randn(64) * 3
            sorted_scores, order = logits.sort(descending=True)
            probabilities = sorted_scores.softmax(dim=-1)
            covered_before = probabilities.cumsum(dim=-1) - probabilities
            expected = set(order[covered_before < top_p].tolist())
            config = DecodingConfig(do_sample=True, top_p=top_p)
            scores = logits_processors(config)(torch.zeros((1, 0), dtype=torch.long), logits.unsqueeze(0))[0]
            assert set(torch.isfinite(scores).nonzero().flatten().tolist()) == expected
    logits = torch.randn(64)
    config = DecodingConfig(do_sample=True, top_p=0.9, temperature=0.7)
    draws = [[int(sample_next_token(logits, config, torch.Generator().manual_seed(seed))) for seed in range(20)]
             for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_top_k_min_p_and_their_validation() -> None:
    logits = torch.tensor([3.0, 2.5, 2.0, 0.0, -1.0, -2.0])
    generator = torch.Generator().manual_seed(0)
    top_two = DecodingConfig(do_sample=True, top_k=2, temperature=5.0)  # hot: without top-k all six would come
    assert {int(sample_next_token(logits, top_two, generator)) for _ in range(200)} == {0, 1}
    # min_p 0.3: keep p >= 0.3 * p(first); exp(-0.5) and exp(-1) pass, exp(-3) does not.
    min_p = DecodingConfig(do_sample=True, min_p=0.3)
    assert {int(sample_next_token(logits, min_p, generator)) for _ in range(300)} == {0, 1, 2}
    for bad in (dict(top_k=-1), dict(min_p=1.5), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DecodingConfig(**bad).validate()


def test_greedy_runs_no_processor_that_changes_nothing() -> None:
    assert len(logits_processors(DecodingConfig())) == 0
    assert len(logits_processors(DecodingConfig(do_sample=True, top_p=1.0))) == 1  # float32 only
    steps = logits_processors(DecodingConfig(do_sample=True, temperature=0.5, top_k=4, top_p=0.9, min_p=0.1,
                                             repetition_penalty=1.2))
    names = [type(step).__name__ for step in steps]
    assert names == ["RepetitionPenaltyLogitsProcessor", "Float32Scores", "TemperatureLogitsWarper",
                     "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]


def test_repetition_penalty_applies_to_the_answer_text_and_keeps_the_masks(bundle) -> None:
    """A hook makes token A (2.0) the favourite over B (1.0). Greedy repeats A; with penalty 4, A's second turn
    scores 0.5 < B's 1.0, then both are penalized (0.5 > 0.25) and A comes back. `<start>` and `</s>` stay masked
    or allowed as without a penalty, and the sampled control tokens are never penalized."""
    tokenizer = bundle.tokenizer
    first, second = 100, 101
    assert not {first, second} & set(tokenizer.all_special_ids)

    def hook(token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros_like(logits)
        scores[first], scores[second] = 2.0, 1.0
        return scores

    generator = InterleavedGenerator.from_bundle(bundle)
    prompt = conversation(("user", "Describe a dog on a beach."))
    plain = generator.generate(prompt, DecodingConfig(max_new_tokens=4), logits_processor=hook).token_ids
    penalized = generator.generate(
        prompt, DecodingConfig(max_new_tokens=4, repetition_penalty=4.0), logits_processor=hook
    ).token_ids
    assert plain == [first] * 4
    assert penalized == [first, second, first, first]
    # A penalized answer still obeys the control-token rules: a forced `<image>` is masked.
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def image_hook(token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        scores = hook(token_ids, logits)
        scores[image_id] = 50.0
        return scores

    done = generator.generate(
        prompt, DecodingConfig(max_new_tokens=3, repetition_penalty=4.0), logits_processor=image_hook
    )
    assert image_id not in done.token_ids


# --- Detokenization, limits, assembly --------------------------------------------------------------------


def test_incremental_detokenizer_adds_up_to_the_full_decode(bundle) -> None:
    tokenizer = bundle.tokenizer
    encoder = ConversationEncoder(tokenizer, bundle.model.num_query_tokens)
    text = "A red block. Voilà: 5 € and 😀 — here is   a green one! Ünïcode."
    token_ids = encoder.text_ids(text)
    assert any(tokenizer.convert_ids_to_tokens(token).startswith("<0x") for token in token_ids)  # byte pieces
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in token_ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True) == detokenizer.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[0] == "A"  # the word-start space of the first token is dropped, the others kept
    assert " red" in pieces


@pytest.mark.parametrize(
    "text",
    [
        "A red block. Voilà: 5 € and 😀 — here is   a green one! Ünïcode.",
        "日本語のテキスト😀😀 ok, çà et là: naïve café 🎨🖼️",
    ],
)
def test_decode_stream_pieces_add_up_to_the_full_decode(bundle, text) -> None:
    tokenizer = bundle.tokenizer
    token_ids = ConversationEncoder(tokenizer, bundle.model.num_query_tokens).text_ids(text)
    assert any(tokenizer.convert_ids_to_tokens(token).startswith("<0x") for token in token_ids)  # byte pieces
    detokenizer = detokenizer_for(tokenizer)
    assert isinstance(detokenizer, StreamDetokenizer)  # the tiny Llama tokenizer is a fast one
    pieces = [detokenizer.push(token) for token in token_ids]
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True) == text
    assert detokenizer.flush() == ""
    assert not any("\ufffd" in piece for piece in pieces)
    # A character's byte pieces wait for the last one: the emoji appears whole, in one piece.
    assert any("😀" in piece for piece in pieces) and "" in pieces
    # The same pieces as the window-decoding fallback gives.
    fallback = IncrementalDetokenizer(tokenizer)
    assert [fallback.push(token) for token in token_ids] == pieces


def test_decode_stream_skips_control_tokens_and_survives_broken_bytes(bundle) -> None:
    tokenizer = bundle.tokenizer
    hello = ConversationEncoder(tokenizer, bundle.model.num_query_tokens).text_ids("hello there")
    control = [tokenizer.convert_tokens_to_ids(token) for token in (START_TOKEN, END_TOKEN)] + [tokenizer.eos_token_id]
    # A lead byte of a 4-byte character followed by plain text: bytes a sampling model may well produce.
    lead = tokenizer.convert_tokens_to_ids("<0xF0>")
    for token_ids in (hello + control + hello, hello + [lead] + hello + [lead]):
        detokenizer = StreamDetokenizer(tokenizer)
        pieces = [detokenizer.push(token) for token in token_ids]
        pieces.append(detokenizer.flush())
        assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True) == detokenizer.text
    # "ß" (C3 9F) then a lone lead byte: the full decode turns the whole byte group into U+FFFD, so the "ß"
    # already shown is no longer a prefix of it, and DecodeStream raises. The text goes on after it all the same.
    broken = hello + [tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in (0xC3, 0x9F, 0xF0)] + hello
    detokenizer = StreamDetokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in broken]
    pieces.append(detokenizer.flush())
    assert "".join(pieces).startswith("hello thereß") and "".join(pieces).endswith("\ufffd hello there")


def test_the_name_generation_config_is_left_to_transformers() -> None:
    import textbind.generation

    assert not hasattr(textbind.generation, "GenerationConfig")


def test_join_segments() -> None:
    assert join_segments(["A red block.", " Do you like it?"]) == "A red block. <image> Do you like it?"
    assert join_segments(["", "and", ""]) == "<image> and <image>"
    assert join_segments(["only text "]) == "only text"
    assert join_segments(["spelt <image> out"]) == "spelt  out"


def test_context_limit_and_long_prompts(bundle) -> None:
    prompt = conversation(("user", "Describe a dog on a beach."))
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens)
    prompt_length = len(encoder.encode(prompt, for_inference=True).input_ids)
    generator = InterleavedGenerator.from_bundle(bundle, max_length=prompt_length + 5)
    done = generator.generate(prompt, DecodingConfig(max_new_tokens=50, max_images=0))
    assert done.finish_reason == FINISH_LENGTH or done.token_ids[-1] == bundle.tokenizer.eos_token_id
    assert len(done.token_ids) <= 5
    with pytest.raises(DataError, match="max_length"):
        InterleavedGenerator.from_bundle(bundle, max_length=prompt_length - 1).generate(prompt)


def test_generation_leaves_grad_mode_alone_between_events(bundle) -> None:
    stream = InterleavedGenerator.from_bundle(bundle).stream(
        conversation(("user", "Describe a dog.")), DecodingConfig(max_new_tokens=4)
    )
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    list(stream)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generation_on_cuda(trained, image_dir, green_image, dtype) -> None:
    model = copy.deepcopy(trained.model).to("cuda", dtype)
    bundle = ModelBundle(model, trained.tokenizer, trained.image_processor)
    decoder = RecordingDecoder(green_image)
    recorder = LogitsRecorder()
    conv = prompt_of(image_dir)
    done = InterleavedGenerator.from_bundle(bundle, decoder).generate(
        conv, DecodingConfig(max_new_tokens=40, do_sample=True, top_p=0.5, temperature=0.5), logits_processor=recorder
    )
    assert all(logits.device.type == "cuda" and logits.dtype == dtype for _, logits in recorder.steps)
    assert done.turn.caption_list == [TRAINED_CAPTION] and decoder.calls
    assert_cached_logits_match_recompute(bundle, conv, recorder, done.turn.image_list, atol=0.25, rtol=0.05)


def test_sampling_options_reach_the_config_from_the_command_line() -> None:
    import argparse

    from textbind.runtime import add_generation_arguments, generation_config_from_arguments

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    defaults = generation_config_from_arguments(parser.parse_args([]))
    assert (defaults.top_k, defaults.min_p, defaults.repetition_penalty) == (0, 0.0, 1.0)
    config = generation_config_from_arguments(
        parser.parse_args(["--do-sample", "--top-k", "5", "--min-p", "0.05", "--repetition-penalty", "1.3"])
    )
    assert (config.top_k, config.min_p, config.repetition_penalty) == (5, 0.05, 1.3)
    with pytest.raises(ValueError, match="min_p"):
        generation_config_from_arguments(parser.parse_args(["--min-p", "2"]))
