"""The MIM model: image embeddings at placeholders, output types, trainable modules, the fast mask path."""

from __future__ import annotations

import pytest
import torch

from textbind.data.collate import allowed_attention, attention_mask_for, collate
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.loss import compute_loss
from textbind.model.builder import build_model

from helpers import conversation, one_output_image, several_output_images


@pytest.fixture
def encoder(bundle):
    return ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=768)


def test_image_embeddings_land_at_placeholders(bundle, encoder, image_dir):
    samples = [prepare_sample(several_output_images(image_dir), encoder, bundle.image_processor),
               prepare_sample(one_output_image(image_dir), encoder, bundle.image_processor)]
    batch = collate(samples, bundle.tokenizer.pad_token_id)
    model = bundle.model
    q = model.num_query_tokens
    with torch.no_grad():
        image_embeds = model.encode_images(batch.pixel_values)  # (N, Q, D)
        embeds = model.embed_inputs(batch.input_ids, image_embeds)
        plain = model.language_model.get_input_embeddings()(batch.input_ids)
    image_index = 0
    for row, (encoded, _) in enumerate(samples):
        covered = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool)
        for start in encoded.image_positions:  # user and assistant images alike
            assert torch.equal(embeds[row, start : start + q], image_embeds[image_index])
            covered[start : start + q] = True
            image_index += 1
        assert torch.equal(embeds[row, ~covered], plain[row, ~covered])
    assert image_index == image_embeds.shape[0] == 4 + 2
    # distinct images give distinct embeddings (a blind random encoder would hide misplacement)
    assert (image_embeds[0] - image_embeds[1]).abs().max() > 1e-3


def test_image_count_mismatch_is_a_clear_error(bundle, encoder, image_dir):
    sample = prepare_sample(one_output_image(image_dir), encoder, bundle.image_processor)
    batch = collate([sample], bundle.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="64 <image> tokens but 1 image"):
        bundle.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values[:1])


def test_forward_output_in_every_mode(bundle, encoder, image_dir):
    sample = prepare_sample(one_output_image(image_dir), encoder, bundle.image_processor)
    batch = collate([sample], bundle.tokenizer.pad_token_id)
    model = bundle.model
    with torch.no_grad():
        plain = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values)
        cached = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, use_cache=True)
        trained = compute_loss(model, batch)
        trained_logits = compute_loss(model, batch, return_logits=True)
    assert plain.loss is None and plain.logits.shape[:2] == batch.input_ids.shape and plain.past_key_values is None
    assert cached.past_key_values is not None
    assert trained.logits is None and trained.loss is not None
    torch.testing.assert_close(trained.loss, trained_logits.loss)
    assert trained.num_target_tokens == int((batch.targets != -100).sum())


def test_plain_padding_mask_equals_dense_mask(bundle, encoder, image_dir):
    """Without branches the (B, L) fast path must give exactly the dense 4-D mask's results."""
    short = conversation(("user", "Hi <image>", ["0.png"]), ("assistant", "Hello."), image_dir=image_dir)
    longer = conversation(("user", "Describe <image> and <image>", ["1.png", "2.png"]),
                          ("assistant", "Two blocks of colour, one blue and one green."), image_dir=image_dir)
    batch = collate([prepare_sample(c, encoder, bundle.image_processor) for c in (short, longer)],
                    bundle.tokenizer.pad_token_id)
    assert not batch.has_branches
    model = bundle.model
    fast_mask = attention_mask_for(batch, torch.float32)
    assert fast_mask.dim() == 2
    allowed = allowed_attention(batch.segment_ids, batch.branch_prefix)
    dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(1)
    with torch.no_grad():
        fast = model(input_ids=batch.input_ids, attention_mask=fast_mask, position_ids=batch.position_ids,
                     pixel_values=batch.pixel_values, targets=batch.targets)
        slow = model(input_ids=batch.input_ids, attention_mask=dense, position_ids=batch.position_ids,
                     pixel_values=batch.pixel_values, targets=batch.targets)
    valid = batch.segment_ids >= 0
    torch.testing.assert_close(fast.logits[valid], slow.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.loss, slow.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "trainable",
    [["query_tokens", "qformer", "qformer_projection"], ["qformer_projection", "language_model"], ["vision_model"]],
)
def test_only_selected_modules_get_gradients(model_config, image_dir, trainable):
    from dataclasses import replace

    built = build_model(replace(model_config, trainable=trainable))
    model = built.model
    encoder = ConversationEncoder(built.tokenizer, model.num_query_tokens)
    batch = collate([prepare_sample(one_output_image(image_dir), encoder, built.image_processor)],
                    built.tokenizer.pad_token_id)
    compute_loss(model, batch).loss.backward()
    assert model.trainable_module_names() == [n for n in ("vision_model", "query_tokens", "qformer",
                                                          "qformer_projection", "language_model") if n in trainable]
    for name, parameter in model.named_parameters():
        module = name.split(".")[0]
        if module in trainable:
            assert parameter.requires_grad
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    # every selected module really receives a gradient
    for module in trainable:
        grads = [p.grad for n, p in model.named_parameters() if n.split(".")[0] == module]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), module


def test_unknown_trainable_module_rejected(bundle):
    with pytest.raises(ValueError, match="unknown module"):
        bundle.model.set_trainable(["qformer", "lm"])
