"""Tests of the toy data writers: stage-1 shards, stage-2 conversations, eval sets and the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from textbind import IMAGE_TOKEN
from textbind.toy import dialogue
from textbind.toy.datagen import (
    EVAL_STREAM,
    STAGE1_STREAM,
    STAGE2_STREAM,
    main,
    stream_rng,
    write_eval_sets,
    write_stage1_shards,
    write_stage2_json,
)
from textbind.toy.world import (
    BACKGROUND_COLOUR,
    COLOURS,
    LAYOUT_POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    caption,
    parse_caption,
    random_scene,
)

STAGE2_CONVERSATIONS = 300


def region_colours(image: Image.Image, scene: Scene) -> list[str]:
    """Dominant palette colour of the non-background pixels in each object's half of ``image``."""
    pixels = np.asarray(image.convert("RGB")).astype(int)  # (H, W, 3)
    half = pixels.shape[0] // 2
    areas = {
        "single": [pixels],
        "horizontal": [pixels[:, :half], pixels[:, half:]],
        "vertical": [pixels[:half], pixels[half:]],
    }[scene.layout]
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names])  # (C, 3)
    colours = []
    for area in areas:
        # JPEG blurs edges: count only pixels far from the background.
        foreground = area[np.abs(area - np.array(BACKGROUND_COLOUR)).sum(-1) > 60]  # (N, 3)
        nearest = np.abs(foreground[:, None, :] - palette[None]).sum(-1).argmin(1)
        colours.append(names[int(np.bincount(nearest, minlength=len(names)).argmax())])
    return colours


def assert_image_shows(image: Image.Image, text: str) -> None:
    scene = parse_caption(text)
    assert scene is not None, text
    assert region_colours(image, scene) == [item.colour for item in scene.objects], text


# ---------------------------------------------------------------------------------------------
# Stage 1


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_stage1_shards_are_readable_by_webdataset(tmp_path: Path, extension: str) -> None:
    pattern = write_stage1_shards(tmp_path / "shards", 25, 10, seed=0, image_extension=extension)
    assert pattern == f"{tmp_path / 'shards'}/{{00000..00002}}.tar"
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    dataset = webdataset.WebDataset(pattern, shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == 25
    assert [sample["__key__"] for sample in samples] == [f"{index:09d}" for index in range(25)]
    for sample in samples:
        image, text, metadata = sample[extension], sample["txt"], sample["json"]
        assert image.size == (64, 64)
        assert metadata["key"] == sample["__key__"] and metadata["caption"] == text
        assert_image_shows(image, text)
    layouts = {parse_caption(sample["txt"]).layout for sample in samples}  # type: ignore[union-attr]
    assert layouts == {"single", "horizontal", "vertical"}


def test_stage1_png_is_lossless(tmp_path: Path) -> None:
    pattern = write_stage1_shards(tmp_path, 5, 5, seed=3)
    for sample in webdataset.WebDataset(pattern, shardshuffle=False).decode("rgb8"):
        colours = {tuple(pixel) for pixel in sample["png"].reshape(-1, 3)}
        assert colours <= {BACKGROUND_COLOUR, *COLOURS.values()}


def test_stage1_is_deterministic(tmp_path: Path) -> None:
    write_stage1_shards(tmp_path / "a", 12, 5, seed=4)
    write_stage1_shards(tmp_path / "b", 12, 5, seed=4)
    write_stage1_shards(tmp_path / "c", 12, 5, seed=5)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "c" / "00000.tar").read_bytes()
    assert not list(tmp_path.glob("*/*.tmp"))


def test_stage1_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_stage1_shards(tmp_path, 0, 10, seed=0)
    with pytest.raises(ValueError):
        write_stage1_shards(tmp_path, 10, 10, seed=0, image_extension="gif")


# ---------------------------------------------------------------------------------------------
# Stage 2


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("stage2")
    out_path, image_dir = root / "train.json", root / "images"
    write_stage2_json(out_path, image_dir, STAGE2_CONVERSATIONS, seed=0)
    return out_path, image_dir, json.loads(out_path.read_text())


def test_stage2_records_obey_the_format(stage2: tuple[Path, Path, list[dict]]) -> None:
    _, image_dir, records = stage2
    assert len(records) == STAGE2_CONVERSATIONS
    all_names = []
    for record in records:
        assert set(record) == {"conversation", "image_dir"}
        assert record["image_dir"] == str(image_dir)
        turns = record["conversation"]
        if turns[0]["role"] == "system":
            assert turns[0]["content"] and not turns[0]["image_list"]
            turns = turns[1:]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [turn["role"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2)
        for turn in turns:
            assert set(turn) == {"role", "content", "image_list", "caption_list"}
            assert turn["content"].count(IMAGE_TOKEN) == len(turn["image_list"]) == len(turn["caption_list"])
            for text in turn["caption_list"]:
                assert parse_caption(text) is not None and caption(parse_caption(text)) == text
            all_names.extend(turn["image_list"])
    assert len(all_names) == len(set(all_names))
    assert sorted(path.name for path in image_dir.iterdir()) == sorted(all_names)


def test_stage2_images_show_their_captions(stage2: tuple[Path, Path, list[dict]]) -> None:
    _, image_dir, records = stage2
    checked = 0
    for record in records[:60]:
        for turn in record["conversation"]:
            for name, text in zip(turn["image_list"], turn["caption_list"], strict=True):
                with Image.open(image_dir / name) as image:
                    assert image.format == "PNG" and image.size == (64, 64)
                    assert_image_shows(image, text)
                checked += 1
    assert checked > 50


def test_stage2_mixes_every_kind(stage2: tuple[Path, Path, list[dict]]) -> None:
    _, _, records = stage2
    counts = dict.fromkeys(["system", "describe", "question", "compare", "draw", "edit", "multi_turn", "mixed"], 0)
    for record in records:
        turns = record["conversation"]
        counts["system"] += turns[0]["role"] == "system"
        user_turns = [turn for turn in turns if turn["role"] == "user"]
        assistant_turns = [turn for turn in turns if turn["role"] == "assistant"]
        counts["multi_turn"] += len(user_turns) > 1
        counts["compare"] += any(len(turn["image_list"]) == 2 for turn in user_turns)
        drawn = [turn for turn in assistant_turns if turn["image_list"]]
        counts["draw"] += bool(drawn)
        counts["describe"] += any(
            parse_caption(turn["content"].split("shows ")[-1].split("see ")[-1]) is not None
            for turn in assistant_turns
            if not turn["image_list"]
        )
        counts["question"] += any(turn["content"].startswith(("It is", "It's")) for turn in assistant_turns)
        has_user_image = any(turn["image_list"] for turn in user_turns)
        counts["mixed"] += bool(drawn) and has_user_image
    edits = [turn for record in records for turn in record["conversation"] if turn["content"].startswith("Now ")]
    counts["edit"] = len(edits)
    for kind, count in counts.items():
        assert count >= 5, (kind, counts)
    assert counts["system"] < STAGE2_CONVERSATIONS / 4


def _previous_images(turns: list[dict], index: int) -> list[str]:
    return [text for turn in turns[:index] for text in turn["caption_list"]]


def test_stage2_drawings_answer_the_request(stage2: tuple[Path, Path, list[dict]]) -> None:
    """A drawn image either is exactly what the user asked for, or edits the latest image."""
    _, _, records = stage2
    requests = edits = 0
    for record in records:
        turns = record["conversation"]
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant" or not turn["image_list"]:
                continue
            (drawn,) = turn["caption_list"]
            request = turns[index - 1]["content"]
            if request.rstrip(".?").endswith(drawn) and re.match(
                r"(Draw|Can you draw|Please draw|Show|Generate|I would|Make a|Paint a)", request
            ):
                requests += 1
                continue
            earlier = _previous_images(turns, index)
            assert earlier, request
            assert parse_caption(drawn) != parse_caption(earlier[-1]), (request, drawn)
            edits += 1
    assert requests > 20 and edits > 20


@pytest.mark.parametrize("seed", range(4))
def test_question_answers_are_true(seed: int) -> None:
    """Resolve the question's referring expression by its attribute words and check the answer."""
    rng = random.Random(seed)
    attribute_words = {
        **{colour: "colour" for colour in COLOURS},
        **{shape: "shape" for shape in SHAPES},
        **{size: "size" for size in SIZES},
        **{position: "position" for positions in LAYOUT_POSITIONS.values() for position in positions},
    }
    checked = 0
    for _ in range(400):
        scene = random_scene(rng)
        question, answer = dialogue.random_question(rng, scene)
        match = re.match(
            r"(?:What colour is|Which colour does|What is the colour of|What shape is|What kind of shape is"
            r"|Is|How big is|What size is|Where is) (?P<ref>it|the [a-z ]+?)"
            r"(?: have| placed| small or large| (?P<asked>" + "|".join(COLOURS) + "))?\\?$",
            question,
        )
        if match is None or question.startswith("Is there"):
            continue
        words = match.group("ref").split()
        candidates = [
            index
            for index, item in enumerate(scene.objects)
            if all(
                getattr(item, attribute_words[word]) == word
                if attribute_words.get(word) != "position"
                else scene.positions[index] == word
                for word in words
                if word in attribute_words
            )
        ]
        assert len(candidates) == 1, (caption(scene), question)
        item = scene.objects[candidates[0]]
        position = scene.positions[candidates[0]]
        asked = match.group("asked")
        if asked in COLOURS:
            expected = "Yes, it is." if asked == item.colour else f"No, it is {item.colour}."
            assert answer == expected, (caption(scene), question, answer)
        else:
            said = set(re.findall(r"[a-z]+", answer.lower()))
            named = said & set(attribute_words)
            assert named and named <= {item.colour, item.shape, item.size, position}, (
                caption(scene),
                question,
                answer,
            )
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("seed", range(3))
def test_edits_change_the_scene_as_asked(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        scene = random_scene(rng)
        instruction, edited = dialogue.random_edit(rng, scene)
        assert edited != scene, instruction
        named_values = set(re.findall(r"[a-z]+", instruction))
        if instruction.startswith(("make", "colour", "paint", "change", "turn")):
            assert edited.layout == scene.layout
            changed = [
                (before, after) for before, after in zip(scene.objects, edited.objects, strict=True) if before != after
            ]
            assert len(changed) == 1, instruction
            before, after = changed[0]
            differing = [name for name in ("colour", "shape", "size") if getattr(before, name) != getattr(after, name)]
            assert len(differing) == 1
            new_value = getattr(after, differing[0])
            assert new_value in named_values or {"bigger", "smaller"} & named_values, (instruction, new_value)
        elif instruction.startswith(("remove", "take away", "delete", "keep only")):
            assert edited.layout == "single" and edited.objects[0] in scene.objects
        elif instruction.startswith(("add", "also draw", "put a")):
            assert scene.layout == "single" and edited.layout != "single" and scene.objects[0] in edited.objects
            added = re.search(r"a (small|large) [a-z]+ [a-z]+ on the [a-z]+", instruction)
            assert added is not None and added.group(0) in caption(edited), (instruction, caption(edited))
        else:  # swap or re-layout keep the same two objects
            assert sorted(map(repr, edited.objects)) == sorted(map(repr, scene.objects)), instruction


def test_stage2_is_deterministic(tmp_path: Path) -> None:
    def write(seed: int) -> tuple[bytes, str]:
        write_stage2_json(tmp_path / "train.json", tmp_path / "images", 40, seed=seed)
        images = hashlib.sha256()
        for path in sorted((tmp_path / "images").iterdir()):
            images.update(path.name.encode() + path.read_bytes())
        return (tmp_path / "train.json").read_bytes(), images.hexdigest()

    first = write(11)
    assert write(11) == first
    assert write(12)[0] != first[0]
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Evaluation sets


def test_eval_sets(tmp_path: Path) -> None:
    paths = write_eval_sets(tmp_path, num_describe=20, num_draw=60, seed=0)
    assert paths == {"describe": tmp_path / "describe.json", "draw": tmp_path / "draw.json"}
    describe = json.loads(paths["describe"].read_text())
    assert len(describe) == 20
    for item in describe:
        assert set(item) == {"image", "scene"}
        with Image.open(tmp_path / item["image"]) as image:
            assert_image_shows(image, item["scene"])
    draw = json.loads(paths["draw"].read_text())
    assert len(draw) == 60
    final_requests = []
    for record in draw:
        assert set(record) == {"conversation", "image_dir", "expected_caption"}
        assert parse_caption(record["expected_caption"]) is not None
        turns = record["conversation"]
        assert [turn["role"] for turn in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"]
        assert not turns[-1]["image_list"]
        for turn in turns:
            assert turn["content"].count(IMAGE_TOKEN) == len(turn["image_list"]) == len(turn["caption_list"])
            for name in turn["image_list"]:
                assert (Path(record["image_dir"]) / name).is_file()
        final_requests.append(len(turns) == 1)
    assert 5 < sum(final_requests) < 55  # plain drawing requests and edits are both there


def test_eval_stream_differs_from_training(tmp_path: Path) -> None:
    assert len({stream_rng(0, name).random() for name in (STAGE1_STREAM, STAGE2_STREAM, EVAL_STREAM)}) == 3
    pattern = write_stage1_shards(tmp_path / "stage1", 10, 10, seed=0)
    train_captions = [sample["txt"] for sample in webdataset.WebDataset(pattern, shardshuffle=False).decode()]
    write_stage2_json(tmp_path / "train.json", tmp_path / "images", 5, seed=0)
    stage2_captions = [
        turn["caption_list"][0]
        for record in json.loads((tmp_path / "train.json").read_text())
        for turn in record["conversation"]
        if turn["caption_list"]
    ]
    paths = write_eval_sets(tmp_path / "eval", num_describe=10, num_draw=0, seed=0)
    eval_captions = [item["scene"] for item in json.loads(paths["describe"].read_text())]
    assert eval_captions != train_captions
    assert eval_captions[:3] != stage2_captions[:3]
    assert eval_captions[0] == caption(random_scene(stream_rng(0, EVAL_STREAM)))


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--out", str(tmp_path), "--seed", "1", "--stage1-samples", "30", "--samples-per-shard", "16"]
    arguments += ["--stage2-conversations", "8", "--eval-describe", "4", "--eval-draw", "4", "--no-progress"]
    main(arguments)
    printed = capsys.readouterr().out
    assert "stage 1: 30" in printed and "stage 2: 8" in printed and "eval: 4" in printed
    assert sorted(path.name for path in (tmp_path / "stage1").iterdir()) == ["00000.tar", "00001.tar"]
    assert len(json.loads((tmp_path / "stage2" / "train.json").read_text())) == 8
    assert any((tmp_path / "stage2" / "images").iterdir())
    assert len(json.loads((tmp_path / "eval" / "describe.json").read_text())) == 4
    assert len(json.loads((tmp_path / "eval" / "draw.json").read_text())) == 4
    samples = list(webdataset.WebDataset(f"{tmp_path}/stage1/{{00000..00001}}.tar", shardshuffle=False))
    assert len(samples) == 30
