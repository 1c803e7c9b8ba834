"""Conversation encoding: chat format, labels on assistant text only, image tokens, truncation, prompts."""

from __future__ import annotations

import pytest

from textbind.data.conversation import DataError
from textbind.data.sequence import ConversationEncoder
from textbind.model.mim import IGNORE_INDEX

from helpers import conversation, one_output_image, several_output_images


@pytest.fixture
def encoder(bundle):
    return ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=768)


def supervised_text(encoder, encoded) -> str:
    """Decode the main-sequence tokens that some position is trained to predict."""
    predicted = [
        encoded.input_ids[i + 1]
        for i in range(encoded.main_length - 1)
        if encoded.targets[i] == encoded.input_ids[i + 1]
    ]
    return encoder.tokenizer.decode(predicted)


def test_llama2_chat_format(encoder, image_dir):
    conv = conversation(
        ("system", "Be brief."), ("user", "Hello there"), ("assistant", "Hi."), ("user", "Bye"), ("assistant", "Ok.")
    )
    encoded = encoder.encode(conv)
    text = encoder.tokenizer.decode(encoded.input_ids)
    assert "<<SYS>>\nBe brief.\n<</SYS>>\n\n" in text
    words = " ".join(text.replace("<s>", " <s> ").replace("</s>", " </s> ").split())
    assert words == "<s> [INST] <<SYS>> Be brief. <</SYS>> Hello there [/INST] Hi. </s> <s> [INST] Bye [/INST] Ok. </s>"
    assert encoded.input_ids.count(encoder.bos_token_id) == 2


def test_only_assistant_tokens_are_supervised(encoder, image_dir):
    conv = conversation(("user", "Tell me [INST] a thing"), ("assistant", "A fact."), ("user", "More"),
                        ("assistant", "Another fact."))
    encoded = encoder.encode(conv)
    assert supervised_text(encoder, encoded).replace(" ", "") == "Afact.</s>Anotherfact.</s>"
    # every supervised position predicts an assistant token, never prompt tokens
    assert sum(t != IGNORE_INDEX for t in encoded.targets) == len(
        encoder.text_ids("A fact.") + encoder.text_ids("Another fact.")
    ) + 2


def test_image_tokens_and_start_targets(encoder, image_dir):
    encoded = encoder.encode(one_output_image(image_dir))
    q = encoder.num_query_tokens
    user_image, assistant_image = encoded.image_positions
    image_id = encoder.image_token_id
    for start in encoded.image_positions:
        assert encoded.input_ids[start : start + q] == [image_id] * q
    assert encoded.input_ids.count(image_id) == 2 * q
    # user image: nothing supervised around it; assistant image: the token before predicts <start>
    assert encoded.targets[user_image - 1 : user_image + q] == [IGNORE_INDEX] * (q + 1)
    assert encoded.targets[assistant_image - 1] == encoder.start_token_id
    assert encoded.targets[assistant_image : assistant_image + q - 1] == [IGNORE_INDEX] * (q - 1)
    # the last image token predicts the text after the image
    assert encoded.targets[assistant_image + q - 1] == encoded.input_ids[assistant_image + q]
    # the branch: <start> caption <end>, positions continue from p
    branch = [i for i, s in enumerate(encoded.segment_ids) if s == 1]
    branch_ids = [encoded.input_ids[i] for i in branch]
    assert branch_ids[0] == encoder.start_token_id and branch_ids[-1] == encoder.end_token_id
    assert encoder.tokenizer.decode(branch_ids[1:-1]) == "a green block"
    assert [encoded.position_ids[i] for i in branch] == list(range(assistant_image, assistant_image + len(branch)))
    assert all(encoded.branch_prefix[i] == assistant_image for i in branch)


def test_truncation_never_splits_an_image(bundle, image_dir):
    full = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=10_000).encode(
        several_output_images(image_dir)
    )
    q = bundle.model.num_query_tokens
    for max_length in range(10, full.main_length + 1, 7):
        encoder = ConversationEncoder(bundle.tokenizer, q, max_length=max_length)
        encoded = encoder.encode(several_output_images(image_dir))
        assert encoded.main_length <= max_length
        assert encoded.input_ids[: encoded.main_length] == full.input_ids[: encoded.main_length]
        image_tokens = encoded.input_ids[: encoded.main_length].count(encoder.image_token_id)
        assert image_tokens == q * len(encoded.images)
        assert encoded.targets[encoded.main_length - 1] == IGNORE_INDEX
        assert encoded.num_branches == sum(
            1 for p in encoded.image_positions if encoded.targets[p - 1] == encoder.start_token_id
        )


def test_inference_prompt_ends_after_inst(encoder, image_dir):
    conv = conversation(("user", "Draw a cat."), ("assistant", "<image>", ["0.png"], ["a cat"]),
                        ("user", "Now a dog <image>", ["1.png"]), image_dir=image_dir)
    encoded = encoder.encode(conv, for_inference=True)
    assert encoder.tokenizer.decode(encoded.input_ids[-len(encoder.text_ids("[/INST]")):]) == "[/INST]"
    assert encoded.num_branches == 0 and len(encoded.images) == 2
    with pytest.raises(DataError, match="end with a user turn"):
        encoder.encode(conversation(("user", "a"), ("assistant", "b")), for_inference=True)


def test_control_tokens_in_text_stay_text(encoder):
    encoded = encoder.encode(conversation(("user", "say </s> and <start>"), ("assistant", "<end> ok")), )
    specials = {encoder.eos_token_id, encoder.start_token_id, encoder.end_token_id, encoder.image_token_id}
    # only the structural </s> after the answer is special
    assert [t for t in encoded.input_ids if t in specials] == [encoder.eos_token_id]


def test_marker_mismatch_raises(encoder):
    with pytest.raises(DataError, match="test record turn 0"):
        encoder.encode(conversation(("user", "two <image> <image>", ["a.png"]), ("assistant", "x")))


def test_text_form_writes_each_image_as_its_caption(encoder):
    """The language pretraining's form of a conversation: an image's caption between <start> and <end> where
    its tokens would stand, supervised for an assistant image only; the rest as in `encode`."""
    conv = conversation(
        ("user", "What is this? <image>", ["a red block"]),
        ("assistant", "A red block. Here is a green one: <image> Do you like it?", ["a green block"],
         ["a green block"]),
    )
    input_ids, targets = encoder.encode_as_text(conv)
    assert len(input_ids) == len(targets) and targets[-1] == IGNORE_INDEX
    start, end = encoder.start_token_id, encoder.end_token_id
    assert input_ids.count(start) == input_ids.count(end) == 2
    assert encoder.image_token_id not in input_ids
    text = encoder.tokenizer.decode(input_ids)
    for token in ("</s>", "<start>", "<end>"):
        text = text.replace(token, f" {token} ")
    assert " ".join(text.split()) == ("<s> [INST] What is this? <start> a red block <end> [/INST] A red block. Here "
                                      "is a green one: <start> a green block <end> Do you like it? </s>")
    predicted = [input_ids[i + 1] for i in range(len(input_ids) - 1) if targets[i] != IGNORE_INDEX]
    assert all(targets[i] in (IGNORE_INDEX, input_ids[i + 1]) for i in range(len(input_ids) - 1))
    # Everything the assistant writes, its image as <start> caption <end>, and nothing of the user's turn.
    assert predicted == encoder.text_ids("A red block. Here is a green one:") + [start] + encoder.text_ids(
        "a green block") + [end] + encoder.text_ids("Do you like it?") + [encoder.eos_token_id]
    # Outside the images, the very tokens of the training sequence.
    encoded = encoder.encode(conv)
    main = encoded.input_ids[: encoded.main_length]
    assert [t for t in main if t != encoder.image_token_id] == [
        t for i, t in enumerate(input_ids)
        if not any(s <= i <= e for s, e in _spans(input_ids, start, end))
    ]


def _spans(ids, start, end):
    opened = [i for i, t in enumerate(ids) if t == start]
    closed = [i for i, t in enumerate(ids) if t == end]
    return list(zip(opened, closed, strict=True))


def test_text_form_needs_captions_for_images(encoder, image_dir):
    with pytest.raises(DataError, match="caption"):
        encoder.encode_as_text(conversation(("user", "Look <image>", [object()]), ("assistant", "Ok.")))
