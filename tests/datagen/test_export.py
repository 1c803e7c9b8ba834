"""Tests for the export to stage-2 JSON: a round trip through load_conversations, images, splits and stats by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from textbind import IMAGE_TOKEN
from textbind.data.conversation import load_conversations
from textbind.datagen.export import ExportConfig, export_records, split_records
from textbind.datagen.filters import filter_records
from textbind.datagen.stats import conversation_stats

REPOSITORY = Path(__file__).resolve().parents[2]
COLOURS = ["red", "blue", "green", "yellow"]


def make_images(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, colour in enumerate(COLOURS):
        path = folder / f"source_{index}.jpg"
        Image.new("RGB", (80, 40), colour).save(path)  # wide: padding shows above and below
        images.append({"key": f"key/{index}", "caption": f"a {colour} rectangle number {index}", "image": path.name,
                       "url": f"http://example.invalid/{index}.jpg"})
    return images


def transcript(number: int) -> str:
    # The assistant quotes image 1 with one typo: within the 0.1 threshold, the ORIGINAL caption is exported.
    return (f"Human: Conversation {number}. What colour is <img0>a red rectangle number 0</img0>?\n"
            f"Assistant: Red. Here is another: <img1>a blue rectangle numbr 1</img1>\n"
            f"Human: Put <img2>a green rectangle number 2</img2> and <img3>a yellow rectangle number 3</img3> "
            f"side by side.\nAssistant: Done, they differ in colour.")


@pytest.fixture()
def filtered(tmp_path) -> list[dict]:
    images = make_images(tmp_path / "pairs")
    result = filter_records([{"id": f"c{number}", "images": images, "response": transcript(number)}
                             for number in range(10)])
    assert len(result.kept) == 10
    return result.kept


def test_round_trip_loads_with_zero_errors(tmp_path, filtered):
    out = tmp_path / "export"
    config = ExportConfig(valid_size=2, test_size=3, seed=1)
    stats = export_records(filtered, out, config, image_root=tmp_path / "pairs")
    assert stats["splits"] == {"train": 5, "valid": 2, "test": 3} and stats["skipped"] == 0
    ids = []
    for split, size in (("train", 5), ("valid", 2), ("test", 3)):
        loaded = load_conversations(out / f"{split}.json", on_bad_record="error", check_images=True)
        assert loaded.errors == [] and len(loaded.conversations) == size
        ids += [record["id"] for record in json.loads((out / f"{split}.json").read_text())]
    assert sorted(ids) == sorted(record["id"] for record in filtered)  # every conversation exactly once

    record = json.loads((out / "train.json").read_text())[0]
    user, assistant, user_2, assistant_2 = record["conversation"]
    assert user["content"].endswith(f"What colour is {IMAGE_TOKEN}?")
    assert assistant == {"role": "assistant", "content": f"Red. Here is another: {IMAGE_TOKEN}",
                         "image_list": ["key_1.jpg"], "caption_list": ["a blue rectangle number 1"],
                         "url_list": ["http://example.invalid/1.jpg"]}
    assert user_2["image_list"] == ["key_2.jpg", "key_3.jpg"] and user_2["content"].count(IMAGE_TOKEN) == 2
    assert assistant_2["image_list"] == [] and assistant_2["url_list"] == []
    assert "<img" not in json.dumps(record)
    # Stable names: one file per source image, whatever the number of conversations using it.
    assert sorted(path.name for path in (out / "images").iterdir()) == [f"key_{index}.jpg" for index in range(4)]
    assert (out / "images" / "key_0.jpg").read_bytes() == (tmp_path / "pairs" / "source_0.jpg").read_bytes()

    # The same input and seed give the same files; another seed another split.
    again = export_records(filtered, tmp_path / "again", config, image_root=tmp_path / "pairs")
    assert again["images_copied"] == 4
    for split in ("train", "valid", "test"):
        first = json.loads((out / f"{split}.json").read_text())
        second = json.loads((tmp_path / "again" / f"{split}.json").read_text())
        assert [r["conversation"] for r in first] == [r["conversation"] for r in second]
    resumed = export_records(filtered, out, config, image_root=tmp_path / "pairs")
    assert resumed["images_copied"] == 0 and resumed["images_reused"] == 4
    other = split_records(filtered, ExportConfig(valid_size=2, test_size=3, seed=2))
    assert [r["id"] for r in other["valid"]] != [r["id"] for r in json.loads((out / "valid.json").read_text())] or \
        [r["id"] for r in other["test"]] != [r["id"] for r in json.loads((out / "test.json").read_text())]


def test_resized_images_are_padded_on_white(tmp_path, filtered):
    out = tmp_path / "export"
    export_records(filtered, out, ExportConfig(valid_size=1, test_size=1, resize=True, image_size=64),
                   image_root=tmp_path / "pairs")
    with Image.open(out / "images" / "key_1.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert image.getpixel((32, 1)) == (255, 255, 255)  # padding above the 2:1 picture
        red, green, blue = image.getpixel((32, 32))
        assert blue > 200 and red < 30 and green < 30  # the picture itself, centred
    assert load_conversations(out / "train.json", check_images=True).errors == []


def test_missing_images_and_broken_records_are_skipped_and_named(tmp_path, filtered):
    (tmp_path / "pairs" / "source_3.jpg").unlink()
    broken_roles = dict(filtered[1], id="bad-roles", turns=[{"role": "assistant", "content": "hi"}])
    records = [filtered[0], broken_roles, {"id": "no-turns", "images": []}]
    stats = export_records(records, tmp_path / "export", ExportConfig(valid_size=0, test_size=0),
                           image_root=tmp_path / "pairs")
    assert stats["conversations"] == 0 and stats["skipped"] == 3
    messages = " | ".join(stats["skipped_messages"])
    assert "record c0: images[3] file" in messages and "source_3.jpg not found" in messages
    assert "bad-roles" in messages and "no-turns" in messages


def test_stats_by_hand():
    records = [
        {"conversation": [
            {"role": "user", "content": "a b c <image>", "image_list": ["1.png"]},
            {"role": "assistant", "content": "a b c d"},
            {"role": "user", "content": "x y"},
            {"role": "assistant", "content": "<image> x y z", "image_list": ["2.png"], "caption_list": ["q"]}]},
        {"conversation": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "A b c"},
            {"role": "assistant", "content": "e f g"}]},
    ]
    stats = conversation_stats(records)
    assert stats["conversations"] == 2
    assert stats["utterances_per_conversation"] == {"mean": 3.0, "min": 2, "max": 4, "distribution": {"2": 1, "4": 1}}
    assert stats["images_per_conversation"]["mean"] == 1.0
    assert stats["images_per_conversation"]["distribution"] == {"0": 1, "2": 1}
    assert (stats["images_in_user_turns"], stats["images_in_assistant_turns"]) == (1, 1)
    diversity = stats["diversity"]
    # Turn 0: "a b c" twice -> bigrams 2/4 + trigrams 1/2 = 1.0; turn 1: all distinct, 2-, 3- and 4-grams -> 3.0;
    # turn 2: "x y" -> 1.0; turn 3: "x y z" -> 2.0.
    assert [row["diversity"] for row in diversity["per_turn_index"]] == pytest.approx([1.0, 3.0, 1.0, 2.0])
    assert diversity["all"] == pytest.approx(7 / 4)
    assert diversity["user"] == pytest.approx(1.0)  # ("a b c" x2 -> 1.0, "x y" -> 1.0)
    assert diversity["assistant"] == pytest.approx(2.5)  # ("a b c d", "e f g" -> 3.0; "x y z" -> 2.0)


def test_command_line_export(tmp_path, filtered):
    filtered_path = tmp_path / "pairs" / "filtered.jsonl"  # relative image paths resolve from the input's folder
    filtered_path.write_text("".join(json.dumps(record) + "\n" for record in filtered) + "{broken\n")
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "textbind", "datagen", "export", "--input", str(filtered_path), "--out", str(out),
         "export.valid_size=1", "test_size=1", "export.seed=3"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "train 8, valid 1, test 1" in completed.stdout and "line 11: not valid JSON" in completed.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["conversations"] == 10 and stats["images_per_conversation"]["mean"] == 4.0
    assert (stats["images_in_user_turns"], stats["images_in_assistant_turns"]) == (30, 10)
    assert load_conversations(out / "train.json", check_images=True).errors == []
