"""Packed sequences: the same loss and gradients as padded batches, no sample sees another, exact resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from textbind.config import MODULE_NAMES
from textbind.data.collate import allowed_attention, attention_mask_for, collate
from textbind.data.conversation import load_conversations
from textbind.data.packing import collate_packed, encode_within, first_fit, pack_rows, prepare_packable_sample
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.data.streams import Stage1Source, Stage2Source, StreamLoader, StreamPosition, TrainStream
from textbind.loss import compute_loss, scale_for_backward, step_target_tokens
from textbind.model.attention import FLEX_IMPLEMENTATION, bucket_length
from textbind.model.builder import build_model
from textbind.toy.datagen import write_stage1_shards, write_stage2_json

from helpers import conversation, one_output_image, several_output_images

MAX_LENGTH = 300  # long enough for most samples; the longest one below is cut (truncation)


@pytest.fixture(scope="module")
def trainable(model_config):
    """The tiny model with every module trainable (as tests/helpers.py `overfit` builds it), dropout off."""
    torch.manual_seed(0)
    built = build_model(replace(model_config, trainable=list(MODULE_NAMES)))
    built.model.eval()  # dropout off: the two layouts must see the same function
    return built


def mixed_conversations(image_dir):
    """Images in user and assistant turns, several branches, very different lengths, one truncated."""
    long_answer = " ".join(["The blocks are stacked and then moved around the table."] * 6)
    return [
        conversation(("user", "Hi <image>", ["0.png"]), ("assistant", "Hello."), image_dir=image_dir, source="short"),
        several_output_images(image_dir),  # three branches
        one_output_image(image_dir),
        conversation(("user", "Tell me a story."), ("assistant", "Once."), source="text only"),
        conversation(  # longer than MAX_LENGTH: its second assistant image and that branch are cut
            ("user", "Look: <image>", ["3.png"]),
            ("assistant", long_answer + " Here: <image>", ["4.png"], ["a purple block"]),
            ("user", "And another?"),
            ("assistant", "Sure: <image>", ["5.png"], ["an orange block on a red one"]),
            image_dir=image_dir, source="truncated"),
    ]


@pytest.fixture(scope="module")
def samples(trainable, image_dir):
    encoder = ConversationEncoder(trainable.tokenizer, trainable.model.num_query_tokens, MAX_LENGTH)
    prepared = [prepare_sample(c, encoder, trainable.image_processor) for c in mixed_conversations(image_dir)]
    lengths = [len(encoded) for encoded, _ in prepared]
    assert max(lengths) > 5 * min(lengths)
    assert prepared[-1][0].main_length <= MAX_LENGTH and prepared[-1][0].num_branches == 1  # truncated
    return prepared


def loss_and_gradients(model, batch, reduction="mean", scale=None):
    model.zero_grad(set_to_none=True)
    output = compute_loss(model, batch, reduction=reduction)
    loss = output.loss if scale is None else scale(output.loss)
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return output.loss.detach(), gradients


def assert_same_gradients(expected, actual):
    assert expected.keys() == actual.keys()
    assert {name.split(".")[0] for name in expected} == set(MODULE_NAMES)  # every module received a gradient
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(trainable, samples):
    pad = trainable.tokenizer.pad_token_id
    padded = collate(samples, pad)
    packed = collate_packed(samples, pad, pack_length=320)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # really packed: fewer rows
    assert packed.is_packed and packed.has_branches and not padded.is_packed
    assert packed.num_target_tokens == padded.num_target_tokens
    assert packed.num_tokens == padded.num_tokens
    padded_loss, padded_gradients = loss_and_gradients(trainable.model, padded)
    packed_loss, packed_gradients = loss_and_gradients(trainable.model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=1e-6)
    assert_same_gradients(padded_gradients, packed_gradients)


def test_token_mean_over_micro_batches_equals_one_batch(trainable, samples):
    """Summed micro-batch losses over the step's token count: the gradient of one batch of all samples."""
    pad = trainable.tokenizer.pad_token_id
    _, whole = loss_and_gradients(trainable.model, collate(samples, pad))
    micro_batches = [collate_packed(samples[:1], pad, 320), collate_packed(samples[1:], pad, 320)]
    assert micro_batches[0].num_target_tokens != micro_batches[1].num_target_tokens
    step_tokens = step_target_tokens(micro_batches)
    accumulated: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        _, gradients = loss_and_gradients(trainable.model, batch, "sum",
                                          lambda loss: scale_for_backward(loss, step_tokens))
        for name, gradient in gradients.items():
            accumulated[name] = accumulated.get(name, 0) + gradient
    assert_same_gradients(whole, accumulated)


def test_samples_cannot_see_each_other(trainable, samples, image_dir):
    pad = trainable.tokenizer.pad_token_id
    packed = collate_packed(samples, pad, pack_length=1000)
    assert packed.input_ids.shape[0] == 1  # all in one row
    mutated_samples = list(samples)
    encoded, pixels = samples[2]
    changed = replace(encoded, input_ids=list(encoded.input_ids))
    changed.input_ids[3] = changed.input_ids[3] + 1  # a text token of the user's turn
    mutated_samples[2] = (changed, torch.flip(pixels, dims=[-1]))  # and its images
    mutated = collate_packed(mutated_samples, pad, pack_length=1000)
    assert torch.equal(mutated.sample_ids, packed.sample_ids)
    with torch.no_grad():
        before = compute_loss(trainable.model, packed, return_logits=True).logits[0]
        after = compute_loss(trainable.model, mutated, return_logits=True).logits[0]
    slot = int(packed.sample_ids[0][packed.input_ids[0] != mutated.input_ids[0]][0])
    mine = packed.sample_ids[0] == slot
    others = (packed.sample_ids[0] >= 0) & ~mine
    assert not torch.allclose(before[mine], after[mine], atol=1e-4)  # the mutation matters to its own sample
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)


def test_chunked_mask_equals_the_dense_rule(trainable, samples):
    packed = collate_packed(samples, trainable.tokenizer.pad_token_id, pack_length=320)
    allowed = allowed_attention(packed.segment_ids, packed.branch_prefix, packed.sample_ids, packed.position_ids)
    dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(1)
    for chunk in (7, 1 << 22):  # several chunks per row, and one
        assert torch.equal(attention_mask_for(packed, torch.float32, chunk_elements=chunk), dense)
    # no key of another sample is visible anywhere
    same_sample = packed.sample_ids[:, :, None] == packed.sample_ids[:, None, :]
    assert not (allowed & ~same_sample).any()


def test_rows_stay_within_the_pack_length_and_are_balanced():
    lengths = [90, 10, 50, 50, 70, 30, 100, 5]
    rows = first_fit(lengths, 100)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[index] for index in row) <= 100 for row in rows)
    assert len(rows) == 5 and rows == first_fit(lengths, 100)  # 405 tokens: 5 rows is the least
    # one full row and a ragged one become two even rows (less padding), still within the limit
    lengths = [300, 280, 250, 90, 60, 40, 20]
    assert [sum(lengths[i] for i in row) for row in first_fit(lengths, 800)] == [790, 250]
    balanced = pack_rows(lengths, 800)
    assert sorted(sum(lengths[i] for i in row) for row in balanced) == [510, 530]
    assert sorted(index for row in balanced for index in row) == list(range(len(lengths)))


def test_a_sample_longer_than_a_row_is_cut_to_fit_never_inside_an_image(trainable, image_dir):
    encoder = ConversationEncoder(trainable.tokenizer, trainable.model.num_query_tokens, 10_000)
    full = encoder.encode(several_output_images(image_dir))
    pack_length = full.main_length  # main + three branches do not fit
    encoded, pixels = prepare_packable_sample(several_output_images(image_dir), encoder,
                                              trainable.image_processor, pack_length)
    assert len(encoded) <= pack_length < len(full)
    assert 0 < encoded.num_branches < full.num_branches and pixels.shape[0] == len(encoded.images)
    query = trainable.model.num_query_tokens
    assert all(position + query <= encoded.main_length for position in encoded.image_positions)
    assert encoded.input_ids[: encoded.main_length] == full.input_ids[: encoded.main_length]
    assert len(encode_within(encoder, one_output_image(image_dir), 10_000)) == len(
        encoder.encode(one_output_image(image_dir)))


@pytest.fixture
def flex_model(trainable):
    model = trainable.model
    model.language_model.set_attn_implementation(FLEX_IMPLEMENTATION)
    yield model
    model.language_model.set_attn_implementation("sdpa")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_equals_sdpa(trainable, samples, flex_model):
    pad = trainable.tokenizer.pad_token_id
    for batch in (collate_packed(samples, pad, 320), collate(samples, pad), collate(samples[3:4], pad)):
        flex_model.language_model.set_attn_implementation("sdpa")
        with torch.no_grad():
            reference = compute_loss(flex_model, batch, return_logits=True)
        flex_model.language_model.set_attn_implementation(FLEX_IMPLEMENTATION)
        with torch.no_grad():
            flexed = compute_loss(flex_model, batch, return_logits=True)
        length = batch.input_ids.shape[1]
        if batch.needs_structured_mask:  # the flex path pads to a length bucket
            assert flexed.logits.shape[1] == bucket_length(length)
        valid = batch.segment_ids >= 0
        torch.testing.assert_close(flexed.logits[:, :length][valid], reference.logits[valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flexed.loss, reference.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_backward_equals_sdpa_on_gpu(trainable, samples, flex_model):
    model = flex_model.to("cuda")
    try:
        packed = collate_packed(samples, trainable.tokenizer.pad_token_id, 320)
        model.language_model.set_attn_implementation("sdpa")
        sdpa_loss, sdpa_gradients = loss_and_gradients(model, packed)
        model.language_model.set_attn_implementation(FLEX_IMPLEMENTATION)
        flex_loss, flex_gradients = loss_and_gradients(model, packed)
        torch.testing.assert_close(flex_loss, sdpa_loss, rtol=1e-4, atol=1e-5)
        for name in sdpa_gradients:
            torch.testing.assert_close(flex_gradients[name], sdpa_gradients[name], rtol=1e-3, atol=1e-4, msg=name)
    finally:
        model.to("cpu")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("packing-data")
    shards = write_stage1_shards(out / "shards", num_samples=24, samples_per_shard=6, seed=0)
    write_stage2_json(out / "train.json", out / "images", num_conversations=16, seed=0)
    return {1: Stage1Source(shards), 2: Stage2Source([load_conversations(out / "train.json")
                                                                         .conversations])}


def packed_stream(bundle, source, pack_length, position=None, workers=0):
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, 256)
    return TrainStream(source, encoder, bundle.image_processor, micro_batch_size=4, seed=5, num_workers=workers,
                       position=position, pack_length=pack_length)


def fingerprint(batch):
    return batch.sources, batch.input_ids.tolist(), batch.sample_ids.tolist(), batch.pixel_values.sum().item()


@pytest.mark.parametrize(("stage", "workers"), [(1, 0), (2, 0), (1, 2)])
def test_packed_streams_resume_exactly(bundle, sources, stage, workers):
    source = sources[stage]
    unpacked = StreamLoader(packed_stream(bundle, source, 0, workers=workers), workers)
    packed = StreamLoader(packed_stream(bundle, source, 512, workers=workers), workers)
    reference = [next(packed) for _ in range(6)]
    # the packed stream holds the very samples of the padded one, in fewer rows
    assert [b.sources for b in reference] == [next(unpacked).sources for _ in range(6)]
    assert all(b.is_packed and b.input_ids.shape[0] < b.num_samples for b in reference)
    first = StreamLoader(packed_stream(bundle, source, 512, workers=workers), workers)
    for _ in range(3):
        next(first)
    saved = StreamPosition.from_dict(json.loads(json.dumps(first.position.to_dict())))
    resumed = StreamLoader(packed_stream(bundle, source, 512, position=saved, workers=workers), workers)
    assert [fingerprint(next(resumed)) for _ in range(3)] == [fingerprint(b) for b in reference[3:]]
