"""Caption branches: each branch's loss and logits equal those of prefix[0:p] + branch run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textbind.data.collate import attention_mask_for, collate
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.loss import compute_loss
from textbind.model.mim import IGNORE_INDEX

from helpers import conversation, one_output_image, several_output_images


def standalone_branch(bundle, encoded, pixel_values, branch: int):
    """Logits and per-token losses of prefix[0:p] + branch as a plain causal sequence."""
    rows = [i for i, segment in enumerate(encoded.segment_ids) if segment == branch]
    start = encoded.branch_prefix[rows[0]]
    branch_ids = [encoded.input_ids[i] for i in rows]
    ids = encoded.input_ids[:start] + branch_ids
    images_in_prefix = [k for k, position in enumerate(encoded.image_positions) if position < start]
    model = bundle.model
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pixel_values[images_in_prefix] if images_in_prefix else None,
        )
    logits = output.logits[0, start:]  # the branch rows
    targets = torch.tensor(branch_ids[1:] + [IGNORE_INDEX])
    assert torch.equal(torch.tensor([encoded.targets[i] for i in rows]), targets)
    losses = F.cross_entropy(logits[:-1], targets[:-1], reduction="none")
    return logits, losses, rows


def branch_rows_in_batch(bundle, samples, row: int):
    batch = collate(samples, bundle.tokenizer.pad_token_id)
    with torch.no_grad():
        output = compute_loss(bundle.model, batch, return_logits=True)
    logits = output.logits[row]
    targets = batch.targets[row].clamp(min=0)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return logits, losses


def check_all_branches(bundle, samples, row):
    encoded, pixel_values = samples[row]
    assert encoded.num_branches >= 1
    batch_logits, batch_losses = branch_rows_in_batch(bundle, samples, row)
    for branch in range(1, encoded.num_branches + 1):
        logits, losses, rows = standalone_branch(bundle, encoded, pixel_values, branch)
        torch.testing.assert_close(batch_logits[rows], logits, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(batch_losses[rows[:-1]], losses, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["llama2", "llama3", "qwen2"])
def bundle(request, bundle_of_style):
    """Every test here runs for each conversation markup: Llama-2 chat, and a Llama-3 / Qwen2 chat template."""
    return bundle_of_style(request.param)


@pytest.fixture
def encoder(bundle):
    return ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=768)


def test_one_output_image(bundle, encoder, image_dir):
    sample = prepare_sample(one_output_image(image_dir), encoder, bundle.image_processor)
    check_all_branches(bundle, [sample], 0)


def test_several_output_images(bundle, encoder, image_dir):
    sample = prepare_sample(several_output_images(image_dir), encoder, bundle.image_processor)
    assert sample[0].num_branches == 3
    check_all_branches(bundle, [sample], 0)


def test_inside_a_padded_batch(bundle, encoder, image_dir):
    short = conversation(("user", "Hi <image>", ["0.png"]), ("assistant", "Hello."), image_dir=image_dir)
    samples = [
        prepare_sample(short, encoder, bundle.image_processor),
        prepare_sample(several_output_images(image_dir), encoder, bundle.image_processor),
        prepare_sample(one_output_image(image_dir), encoder, bundle.image_processor),
    ]
    assert len(samples[0][0]) < len(samples[1][0])  # row 0 and row 2 are padded
    check_all_branches(bundle, samples, 1)
    check_all_branches(bundle, samples, 2)


def test_after_truncation(bundle, image_dir):
    full = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=10_000)
    conversation_ = several_output_images(image_dir)
    encoded = full.encode(conversation_)
    last_image = encoded.image_positions[-1]
    # Cut in the middle of the last (assistant) image: it and its branch must go, the rest stay.
    cut = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=last_image + 5)
    sample = prepare_sample(conversation_, cut, bundle.image_processor)
    truncated = sample[0]
    assert truncated.main_length == last_image
    assert truncated.num_branches == encoded.num_branches - 1
    assert len(truncated.images) == len(encoded.images) - 1
    check_all_branches(bundle, [sample], 0)


def test_branch_tokens_never_predicted_by_main(bundle, encoder, image_dir):
    encoded = encoder.encode(several_output_images(image_dir))
    start_id = encoder.start_token_id
    main_targets = encoded.targets[: encoded.main_length]
    # The only branch token the main sequence predicts is <start>, once per assistant image.
    assert main_targets.count(start_id) == encoded.num_branches
    caption_tokens = {encoded.input_ids[i] for i, s in enumerate(encoded.segment_ids) if s > 0} - {start_id}
    for position in range(encoded.main_length - 1):
        if encoded.targets[position] in caption_tokens:
            assert encoded.targets[position] == encoded.input_ids[position + 1]


def test_markup_is_the_chat_template(bundle, encoder, image_dir):
    """With a chat template, the encoded conversation is the template's rendering of it (images as their tokens),
    and each assistant turn is supervised up to and including the template's end-of-turn token."""
    tokenizer = bundle.tokenizer
    conversation_ = several_output_images(image_dir)
    encoded = encoder.encode(conversation_)
    if encoder.template == "llama2":
        assert tokenizer.decode(encoded.input_ids[:4]).startswith("<s>")
        return
    image_text = "<image>" * bundle.model.num_query_tokens
    messages = [{"role": turn.role, "content": image_text.join(part.strip() for part in turn.content.split("<image>"))}
                for turn in conversation_.turns]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(encoded.input_ids[: encoded.main_length]) == expected
    end_of_turn = [target for target in encoded.targets if target == tokenizer.eos_token_id]
    assert len(end_of_turn) == sum(turn.role == "assistant" for turn in conversation_.turns)
    prompt = conversation(*[(turn.role, turn.content, turn.image_list, turn.caption_list)
                            for turn in conversation_.turns[:-1]], image_dir=image_dir)
    prompt_ids = encoder.encode(prompt, for_inference=True).input_ids
    generation_prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(prompt_ids) == generation_prompt


def test_flash_attention_is_refused_for_a_branch_mask(bundle, encoder, image_dir, monkeypatch):
    """FlashAttention takes padding masks only: with it, a batch with caption branches would silently train every
    caption on the other branches. compute_loss refuses before the forward (no flash-attn package needed to tell);
    a batch without branches keeps its (B, L) padding mask and may use it."""
    plain = conversation(("user", "Hi <image>", ["0.png"]), ("assistant", "Hello."), image_dir=image_dir)
    with_branch = conversation(*[(turn.role, turn.content, turn.image_list, turn.caption_list)
                                 for turn in one_output_image(image_dir).turns], image_dir=image_dir,
                               source="train.json record 7")
    pad = bundle.tokenizer.pad_token_id
    plain_batch = collate([prepare_sample(plain, encoder, bundle.image_processor)], pad)
    branch_batch = collate([prepare_sample(plain, encoder, bundle.image_processor),
                            prepare_sample(with_branch, encoder, bundle.image_processor)], pad)
    assert attention_mask_for(plain_batch, torch.float32, "flash_attention_2").dim() == 2
    assert attention_mask_for(branch_batch, torch.float32, "sdpa").dim() == 4
    monkeypatch.setattr(bundle.model.language_model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="model.attn_implementation=flash_attention_2") as refused:
        compute_loss(bundle.model, branch_batch)
    message = str(refused.value)
    assert "train.json record 7" in message and "test record" not in message  # the rows that need the mask
    assert "sdpa" in message and "flex_attention" in message
