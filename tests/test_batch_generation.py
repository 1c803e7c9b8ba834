"""Batched interleaved decoding: every row of a batch decodes exactly as its conversation decoded alone."""

from __future__ import annotations

import zlib

import pytest
import torch
from PIL import Image
from test_generation import LogitsRecorder, overfit_bundle, special_ids

from textbind.batch_generation import BatchedGenerator, SlotCache, attention_mask
from textbind.generation import FINISH_LENGTH, FINISH_STOP, DecodingConfig, ImageEvent, InterleavedGenerator

from helpers import conversation


class CaptionColourDecoder:
    """A deterministic image decoder: the colour depends on the caption and the seed, so rows get distinct images."""

    def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image:
        code = zlib.crc32(f"{caption}|{seed}".encode())
        return Image.new("RGB", (32, 32), (code & 255, (code >> 8) & 255, (code >> 16) & 255))


def start_at(step: int, start_id: int):
    """A logits processor that makes `<start>` the favourite at one step (if it is allowed there)."""

    def processor(token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(token_ids) == step:
            logits = logits.clone()
            logits[start_id] = logits.max() + 1e4
        return logits

    return processor


class Case:
    """One request: a conversation, a config, an optional forced `<start>`, and whether images are rendered."""

    def __init__(self, conv, config: DecodingConfig, start_step: int | None = None, render: bool = True) -> None:
        self.conv, self.config, self.start_step, self.render = conv, config, start_step, render

    def processor(self, start_id: int) -> tuple[LogitsRecorder, object]:
        recorder = LogitsRecorder()
        if self.start_step is None:
            return recorder, recorder
        forced = start_at(self.start_step, start_id)
        return recorder, lambda token_ids, logits: forced(token_ids, recorder(token_ids, logits))


@pytest.fixture(scope="module")
def trained(model_config, image_dir):
    return overfit_bundle(model_config, str(image_dir))


def cases(image_dir) -> list[Case]:
    trained_prompt = conversation(("user", "What is this? <image>", ["0.png"]), image_dir=image_dir)
    other_image = conversation(("user", "What is this? <image>", ["2.png"]), image_dir=image_dir)
    text_only = conversation(("system", "Be brief."), ("user", "Hello there, draw two things."))
    greedy = DecodingConfig(max_new_tokens=40)
    return [
        Case(trained_prompt, greedy),  # its trained image, at its own step
        Case(other_image, DecodingConfig(max_new_tokens=30, max_caption_tokens=4), start_step=2),
        Case(text_only, DecodingConfig(max_new_tokens=28, max_images=2, max_caption_tokens=5), start_step=6),
        Case(trained_prompt, DecodingConfig(max_new_tokens=5)),  # finishes early, out of budget
        Case(trained_prompt, greedy, render=False),  # captions reported, kept as text
        Case(text_only, DecodingConfig(max_new_tokens=4), start_step=1),  # the budget ends inside a caption
        Case(other_image, DecodingConfig(max_new_tokens=24, do_sample=True, temperature=0.8, seed=5)),
        Case(trained_prompt, DecodingConfig(max_new_tokens=40, seed=3), start_step=9),  # an image at another step
    ]


def decode_alone(bundle, case: Case, start_id: int):
    generator = InterleavedGenerator.from_bundle(bundle, CaptionColourDecoder() if case.render else None)
    recorder, processor = case.processor(start_id)
    return generator.generate(case.conv, case.config, logits_processor=processor), recorder


@pytest.mark.parametrize("max_batch_size", [3, 8])
def test_each_row_of_a_batch_decodes_as_it_does_alone(trained, image_dir, max_batch_size) -> None:
    _, start_id, _ = special_ids(trained.tokenizer)
    all_cases = cases(image_dir)
    alone = [decode_alone(trained, case, start_id) for case in all_cases]

    batched = BatchedGenerator(InterleavedGenerator.from_bundle(trained, CaptionColourDecoder()), max_batch_size)
    recorders, prepared = [], []
    for case in all_cases:
        recorder, processor = case.processor(start_id)
        recorders.append(recorder)
        prepared.append(batched.prepare(case.conv, case.config, render_images=case.render,
                                        logits_processor=processor))
    # Five start together; the others join after 3 and 7 steps (and, with 3 rows, as rows free up).
    results = batched.generate(prepared[:5], join_after={3: prepared[5:7], 7: prepared[7:]})
    assert not batched.busy and batched.rows == []

    images_made = []
    for index, ((reference, reference_logits), done, recorder) in enumerate(zip(alone, results, recorders)):
        where = f"request {index}"
        assert done.token_ids == reference.token_ids, where
        assert done.finish_reason == reference.finish_reason, where
        assert done.turn.content == reference.turn.content, where
        assert done.turn.caption_list == reference.turn.caption_list, where
        assert [image is None for image in done.turn.image_list] == [
            image is None for image in reference.turn.image_list], where
        for image, reference_image in zip(done.turn.image_list, reference.turn.image_list):
            if image is not None:
                assert image.tobytes() == reference_image.tobytes(), where
        assert len(recorder.steps) == len(reference_logits.steps), where
        for step, ((sampled, logits), (reference_sampled, expected)) in enumerate(
            zip(recorder.steps, reference_logits.steps)
        ):
            assert sampled == reference_sampled
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4, msg=f"{where}, step {step}")
        images_made.append([done.token_ids.index(start_id) if start_id in done.token_ids else None,
                            len(done.turn.image_list)])

    # The cases cover what they claim: captions begun at different steps, early ends, both finish reasons.
    end_steps = {step for step, count in images_made if step is not None}
    assert len(end_steps) >= 3, images_made
    assert results[0].finish_reason == FINISH_STOP and results[3].finish_reason == FINISH_LENGTH
    assert results[5].finish_reason == FINISH_LENGTH and len(results[5].turn.image_list) == 1
    assert results[4].turn.image_list == [None] and results[0].turn.image_list[0] is not None


def test_events_of_each_request_stay_with_it(trained, image_dir) -> None:
    batched = BatchedGenerator(InterleavedGenerator.from_bundle(trained, CaptionColourDecoder()), 4)
    prompts = [conversation(("user", "What is this? <image>", [f"{index}.png"]), image_dir=image_dir)
               for index in range(4)]
    requests = [batched.add(batched.prepare(prompt, DecodingConfig(max_new_tokens=30))) for prompt in prompts]
    while batched.busy:
        batched.step()
    for request in requests:
        events = request.take_events()
        done = events[-1]
        text = "".join(event.text for event in events if hasattr(event, "text") and not isinstance(event, ImageEvent))
        images = [event for event in events if isinstance(event, ImageEvent)]
        assert [event.caption for event in images] == done.turn.caption_list
        assert text.replace(" ", "") == done.turn.content.replace("<image>", "").replace(" ", "")


def test_slot_cache_masks_what_a_row_has_not_written() -> None:
    positions = torch.tensor([[2], [0]])
    mask = attention_mask(positions, 4, torch.float32)
    assert mask.shape == (2, 1, 1, 4)
    assert (mask[0, 0, 0, :3] == 0).all() and mask[0, 0, 0, 3] < -1e30
    assert mask[1, 0, 0, 0] == 0 and (mask[1, 0, 0, 1:] < -1e30).all()
    cache = SlotCache(2)
    cache.select(slice(0, 2), torch.tensor([[1], [0]]), 1)
    keys, _ = cache.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)
    assert keys.shape == (2, 1, cache.capacity, 2)
    assert keys[0, 0, 1].tolist() == [1, 1] and keys[0, 0, 0].tolist() == [0, 0] and keys[1, 0, 0].tolist() == [1, 1]
    cache.move_row(0, 1)
    assert torch.equal(cache.keys[0][1], cache.keys[0][0])


def test_a_failing_image_decoder_fails_only_its_request(trained, image_dir) -> None:
    class Failing(CaptionColourDecoder):
        def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image:
            if seed == 99:
                raise RuntimeError("decoder broke")
            return super().__call__(caption, seed=seed)

    batched = BatchedGenerator(InterleavedGenerator.from_bundle(trained, Failing()), 2)
    prompt = conversation(("user", "What is this? <image>", ["0.png"]), image_dir=image_dir)
    failing = batched.add(batched.prepare(prompt, DecodingConfig(max_new_tokens=30, seed=99)))
    healthy = batched.add(batched.prepare(prompt, DecodingConfig(max_new_tokens=30, seed=1)))
    while batched.busy:
        batched.step()
    assert isinstance(failing.error, RuntimeError)
    assert healthy.error is None and healthy.events[-1].turn.image_list[0] is not None


def test_captions_closed_together_are_rendered_in_one_sdxl_call(trained, image_dir, tmp_path) -> None:
    import numpy

    from textbind.image_decoder import SDXLDecoder
    from textbind.testing.tiny_sdxl import build_tiny_sdxl

    base, refiner = build_tiny_sdxl(tmp_path / "sdxl", seed=0)
    decoder = SDXLDecoder.from_pretrained(base, refiner, num_inference_steps=2, high_noise_frac=0.5)
    alone = [decoder("a green block", seed=seed) for seed in (3, 4)]
    together = decoder.render_batch(["a green block", "a green block"], [3, 4])
    for single, batched in zip(alone, together):
        difference = numpy.abs(numpy.asarray(single, dtype=int) - numpy.asarray(batched, dtype=int))
        assert difference.max() <= 2  # the same noise per image; only float rounding differs
    assert numpy.asarray(together[0]).tolist() != numpy.asarray(together[1]).tolist()  # own seeds

    calls = []
    render_batch = decoder.render_batch
    decoder.render_batch = lambda captions, seeds: calls.append(list(seeds)) or render_batch(captions, seeds)
    batched = BatchedGenerator(InterleavedGenerator.from_bundle(trained, decoder), 2)
    prompt = conversation(("user", "What is this? <image>", ["0.png"]), image_dir=image_dir)
    requests = [batched.add(batched.prepare(prompt, DecodingConfig(max_new_tokens=30, seed=seed)))
                for seed in (3, 4)]
    while batched.busy:
        batched.step()
    assert calls == [[3, 4]]  # both rows closed their caption at the same step: one call
    for request in requests:
        assert request.error is None and len(request.events[-1].turn.image_list) == 1
