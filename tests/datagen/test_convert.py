"""Tests for the converters of LLaVA-Instruct, cc_sbu_align and Alpaca records to the stage-2 format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from textbind import IMAGE_TOKEN
from textbind.data.conversation import load_conversations
from textbind.data.streams import Stage2Source, load_stage2_groups
from textbind.datagen.convert import DESCRIBE_PROMPTS, convert

REPOSITORY = Path(__file__).resolve().parents[2]


def run_convert(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textbind", "datagen", "convert", *arguments], cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=120)


def write_llava(folder: Path) -> Path:
    images = folder / "coco"
    images.mkdir(parents=True)
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        Image.new("RGB", (8, 8), "red").save(images / name)
    records = [
        {"id": "before", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is red?"}, {"from": "gpt", "value": "The square."},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Paint."}]},
        {"id": "after", "image": "2.jpg", "conversations": [
            {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "A red square."}]},
        {"id": "unmarked", "image": "3.jpg", "conversations": [
            {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi <start>there<end>."}]},
        {"id": "bad-speaker", "image": "1.jpg", "conversations": [{"from": "bot", "value": "<image> hi"}]},
        {"id": "two-markers", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "Two?"}]},
        {"id": "ends-with-human", "conversations": [{"from": "human", "value": "Hello"}]},
    ]
    path = folder / "llava_instruct.json"
    path.write_text(json.dumps(records))
    return path


def test_llava(tmp_path):
    path = write_llava(tmp_path)
    out = tmp_path / "llava.json"
    completed = run_convert("--format", "llava", "--input", str(path), "--out", str(out),
                            "--image-dir", str(tmp_path / "coco"))
    assert completed.returncode == 0, completed.stderr
    assert "wrote 4 conversations" in completed.stdout and "skipped 3" in completed.stdout
    for name in ("record 4 conversations[0]: unknown speaker 'bot'", "record 5: 2 <image> markers",
                 "record 6: the conversation must end"):
        assert name in completed.stderr, name
    loaded = load_conversations(out, on_bad_record="error", check_images=True)
    by_id = dict(zip([record["id"] for record in json.loads(out.read_text())], loaded.conversations))
    before, after, unmarked, text_only = (by_id[key] for key in ("before", "after", "unmarked", "text-only"))
    assert before.turns[0].content == f"{IMAGE_TOKEN}\nWhat is red?" and before.turns[0].image_list == ["1.jpg"]
    assert [turn.role for turn in before.turns] == ["user", "assistant", "user", "assistant"]
    assert before.turns[2].image_list == [] and before.image_dir == str(tmp_path / "coco")
    assert after.turns[0].content == f"Describe it.\n{IMAGE_TOKEN}"  # placement kept
    assert unmarked.turns[0].content == f"{IMAGE_TOKEN}\nWhat colour?" and unmarked.turns[0].image_list == ["3.jpg"]
    assert text_only.turns[1].content == "Hi there." and text_only.image_dir == ""


def test_cc_sbu_align_folder(tmp_path):
    folder = tmp_path / "cc_sbu_align"
    (folder / "image").mkdir(parents=True)
    annotations = [{"image_id": "2", "caption": "A dog on grass."}, {"image_id": "7", "caption": "Two cats."},
                   {"image_id": "9", "caption": "  "}]
    for annotation in annotations:
        Image.new("RGB", (8, 8), "blue").save(folder / "image" / f"{annotation['image_id']}.jpg")
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    out = tmp_path / "minigpt4.json"
    completed = run_convert("--format", "cc_sbu_align", "--input", str(folder), "--out", str(out), "--check-files")
    assert completed.returncode == 0, completed.stderr
    assert "empty caption for image 9" in completed.stderr
    loaded = load_conversations(out, on_bad_record="error", check_images=True)
    assert len(loaded.conversations) == 2
    dog = loaded.conversations[0]
    user, assistant = dog.turns
    assert user.image_list == ["2.jpg"] and user.content.startswith(IMAGE_TOKEN)
    assert user.content.split("\n", 1)[1] in DESCRIBE_PROMPTS
    assert assistant.content == "A dog on grass." and assistant.image_list == []
    again, _ = convert("cc_sbu_align", folder)
    assert again == json.loads(out.read_text())  # the instruction choice is stable


def test_alpaca_and_the_mixture(tmp_path):
    alpaca = tmp_path / "platypus.jsonl"  # Open-Platypus rows, JSONL
    alpaca.write_text("\n".join(json.dumps(row) for row in [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5", "data_source": "MATH"},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "", "output": "nothing asked"},
        {"instruction": "Mention <image>.", "output": "No image here."},
    ]))
    out = tmp_path / "platypus.json"
    completed = run_convert("--format", "alpaca", "--input", str(alpaca), "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    loaded = load_conversations(out, on_bad_record="error")
    assert [(turn.role, turn.content) for turn in loaded.conversations[1].turns] == [
        ("user", "Translate.\n\nBonjour"), ("assistant", "Hello")]
    assert loaded.conversations[2].turns[0].content == "Mention ."  # text-only: a marker would need an image
    assert len(loaded.conversations) == 3

    llava = tmp_path / "llava.json"
    assert run_convert("--format", "llava", "--input", str(write_llava(tmp_path / "l")), "--out", str(llava),
                       "--image-dir", str(tmp_path / "l" / "coco")).returncode == 0
    # data.train_path + data.train_weights: the training loader takes the converted files as a weighted mixture.
    groups = load_stage2_groups(f"{llava},{out}", "", "error")
    assert [len(group) for group in groups] == [4, 3]
    assert Stage2Source(groups, [2.0, 1.0]).count() == 2 * 4 + 3


def test_unknown_input_is_a_clear_error(tmp_path):
    completed = run_convert("--format", "llava", "--input", str(tmp_path / "missing.json"), "--out",
                            str(tmp_path / "x.json"))
    assert completed.returncode == 2 and "missing.json: no such file" in completed.stderr
