"""Validation of stage-2 records: each problem raises DataError naming the record and field."""

from __future__ import annotations

import json

import pytest

from textbind.data.conversation import DataError, load_conversations, parse_record, validate_conversation
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder

GOOD = {"conversation": [
    {"role": "user", "content": "What is this? <image>", "image_list": ["0.png"], "caption_list": ["a block"]},
    {"role": "assistant", "content": "A block. Another: <image>", "image_list": ["1.png"],
     "caption_list": ["a green block"]},
]}


def bad(mutate):
    record = json.loads(json.dumps(GOOD))
    mutate(record)
    return record


CASES = {
    "roles out of order": (bad(lambda r: r["conversation"].reverse()), r"turn 0: role 'assistant' out of order"),
    "marker count": (bad(lambda r: r["conversation"][0].update(content="no marker")),
                     r"turn 0: content has 0 <image> marker\(s\) but image_list has 1"),
    "assistant image without caption": (bad(lambda r: r["conversation"][1].update(caption_list=[])),
                                        r"turn 1: assistant image\(s\) need a caption"),
    "missing image file": (bad(lambda r: r["conversation"][0].update(image_list=["nope.png"])),
                           r"turn 0: image file .*nope.png not found"),
    "empty conversation": ({"conversation": []}, r"the conversation is empty"),
    "unknown role": (bad(lambda r: r["conversation"][0].update(role="human")), r"turn 0: field 'role'"),
    "not an object": (["a list"], r"expected an object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_problem_names_the_record(case, image_dir, tmp_path):
    record, message = CASES[case]
    records = [GOOD, record, GOOD]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=rf"train.json record 1.*{message}|{message}") as error:
        load_conversations(path, image_dir=str(image_dir), on_bad_record="error")
    assert "record 1" in str(error.value)
    result = load_conversations(path, image_dir=str(image_dir), on_bad_record="skip")
    assert len(result.conversations) == 2 and len(result.errors) == 1 and "record 1" in result.errors[0]


def test_unreadable_image(bundle, image_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "0.png").write_bytes((image_dir / "0.png").read_bytes())
    (tmp_path / "1.png").write_bytes((image_dir / "1.png").read_bytes())
    record = bad(lambda r: r["conversation"][0].update(image_list=["broken.png"]))
    conversation = parse_record(record, "data.json record 4", str(tmp_path))
    validate_conversation(conversation)  # the file exists: only decoding finds the problem
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens)
    with pytest.raises(DataError, match=r"data.json record 4: image .*broken.png is unreadable"):
        prepare_sample(conversation, encoder, bundle.image_processor)
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD, record]))
    result = load_conversations(path, image_dir=str(tmp_path), check_images=True)
    assert len(result.conversations) == 1 and "record 1" in result.errors[0] and "unreadable" in result.errors[0]


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_conversations(path)


def test_stage2_records_from_jsonl_parquet_and_other_formats(image_dir, tmp_path):
    """JSONL and parquet files, LLaVA-Instruct and Alpaca records: all read as validated stage-2 conversations."""
    import datasets

    from textbind.data.conversation import load_conversations

    ours = {"conversation": [{"role": "user", "content": "What is this? <image>", "image_list": ["0.png"]},
                             {"role": "assistant", "content": "A red block."}]}
    llava = {"id": "7", "image": "1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Green."}]}
    alpaca = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("\n".join(json.dumps(record) for record in (ours, llava, alpaca)) + "\n")
    loaded = load_conversations(jsonl, image_dir=str(image_dir), on_bad_record="error")
    assert [len(c.turns) for c in loaded.conversations] == [2, 2, 2] and not loaded.errors
    assert loaded.conversations[1].turns[0].image_list == ["1.png"]
    assert loaded.conversations[2].turns[1].content == "Blue."
    parquet = tmp_path / "ours.parquet"
    datasets.Dataset.from_list([ours, ours]).to_parquet(str(parquet))
    from_parquet = load_conversations(parquet, image_dir=str(image_dir), on_bad_record="error")
    assert [turn.content for turn in from_parquet.conversations[0].turns] == ["What is this? <image>", "A red block."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ours) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl line 2"):
        load_conversations(bad)
