"""Synthetic data of the toy shapes world: stage-1 shards, image-caption pairs, stage-2 conversations, eval sets.

Everything is a pure function of ``seed``. Each writer draws from its own random stream
(``stream_rng(seed, name)``), so stage 1, the data engine's pairs, the synthetic stage 2 and the
held-out evaluation sets never share a sequence of scenes, even for neighbouring seeds.

Command line::

    python -m textbind.toy.datagen --out data/toy --seed 0 --stage1-samples 20000 \\
        --pairs 6000 --stage2-conversations 0 --eval-describe 200 --eval-draw 200

writes ``data/toy/stage1/{00000..}.tar``, ``data/toy/pairs/pairs.jsonl`` with ``data/toy/pairs/images/``
(the data engine's input: ``scripts/quickstart.sh`` makes stage 2 from them with the toy LLM server),
``data/toy/stage2/train.json`` with ``data/toy/stage2/images/`` when ``--stage2-conversations`` is
above 0 (conversations written directly, without the engine) and ``data/toy/eval/{describe,draw}.json``
with ``data/toy/eval/images/``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset
from PIL import Image
from tqdm import tqdm

from textbind.io import atomic_open, atomic_write_jsonl, atomic_write_text
from textbind.toy import dialogue
from textbind.toy.dialogue import Conversation
from textbind.toy.world import (
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    draw_scene,
    random_object,
    random_scene,
)

Turn = dict[str, Any]
Record = dict[str, Any]

STAGE1_STREAM = "stage1"
STAGE2_STREAM = "stage2"
EVAL_STREAM = "eval"
PAIRS_STREAM = "pairs"
IMAGE_EXTENSIONS = ("png", "jpg")


def stream_rng(seed: int, stream: str) -> random.Random:
    """The random stream ``stream`` of ``seed``; different streams (and seeds) are unrelated."""
    # A string seed is hashed (SHA-512) by random.Random: stable across Python versions and
    # without the collisions of "seed + offset" between neighbouring seeds.
    return random.Random(f"textbind.toy/{stream}/{seed}")


def encode_image(image: Image.Image, extension: str = "png") -> bytes:
    """``image`` encoded as PNG (lossless, the default) or JPEG (quality 95)."""
    buffer = io.BytesIO()
    if extension == "png":
        image.save(buffer, format="PNG")
    elif extension in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"unsupported image extension {extension!r}; expected one of {IMAGE_EXTENSIONS}")
    return buffer.getvalue()


def _write_json_list(path: Path, records: Sequence[object]) -> None:
    """Write ``records`` as a JSON list, one record per line, atomically."""
    atomic_write_text(path, "[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n")


# ---------------------------------------------------------------------------------------------
# Stage 1


def write_stage1_shards(
    out_dir: str | os.PathLike[str],
    num_samples: int,
    samples_per_shard: int,
    seed: int,
    image_size: int = 64,
    image_extension: str = "png",
    progress: bool = False,
) -> str:
    """Write image-caption pairs as webdataset tars in the img2dataset layout; return their brace pattern.

    Shards are ``out_dir/00000.tar``, ``out_dir/00001.tar``, ... with ``samples_per_shard``
    samples each (the last may hold fewer). Sample ``KEY`` (nine digits, the sample's index) has
    ``KEY.<image_extension>`` (the image bytes), ``KEY.txt`` (its caption, UTF-8) and ``KEY.json``
    (``{"key", "caption", "width", "height", "status": "success"}``). Tar members carry a fixed
    mtime, so the same arguments give byte-identical shards. Returns e.g.
    ``"out_dir/{00000..00003}.tar"``.
    """
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError("num_samples and samples_per_shard must be positive")
    if image_extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported image extension {image_extension!r}; expected one of {IMAGE_EXTENSIONS}")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    rng = stream_rng(seed, STAGE1_STREAM)
    num_shards = math.ceil(num_samples / samples_per_shard)
    bar = tqdm(total=num_samples, desc="stage-1 shards", unit="sample", disable=not progress)
    for shard_index in range(num_shards):
        path = directory / f"{shard_index:05d}.tar"
        first, last = shard_index * samples_per_shard, min(num_samples, (shard_index + 1) * samples_per_shard)
        with atomic_open(path, "wb") as stream, webdataset.TarWriter(stream, encoder=False, mtime=0) as writer:
            for sample_index in range(first, last):
                scene = random_scene(rng)
                text = caption(scene)
                key = f"{sample_index:09d}"
                metadata = {"key": key, "caption": text, "width": image_size, "height": image_size}
                metadata["status"] = "success"
                image = draw_scene(scene, image_size=image_size, rng=rng)
                writer.write(
                    {
                        "__key__": key,
                        image_extension: encode_image(image, image_extension),
                        "txt": text.encode("utf-8"),
                        "json": json.dumps(metadata).encode("utf-8"),
                    }
                )
                bar.update(1)
    bar.close()
    return f"{directory}/{{00000..{num_shards - 1:05d}}}.tar"


# ---------------------------------------------------------------------------------------------
# Stage-2 conversations: the shared exchanges of textbind.toy.dialogue about invented scenes


class _ImageStore:
    """Draws scenes into ``image_dir`` as numbered PNG files (without a directory: draws only)."""

    def __init__(self, image_dir: Path | None, image_size: int, prefix: str = "") -> None:
        self.image_dir = image_dir
        self.image_size = image_size
        self.prefix = prefix
        self.count = 0
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)

    def save(self, scene: Scene, rng: random.Random) -> str:
        name = f"{self.prefix}{self.count:06d}.png"
        self.count += 1
        # Drawing jitters the shapes from ``rng``: it runs even when nothing is saved, so the stream stays the same.
        image = draw_scene(scene, image_size=self.image_size, rng=rng)
        if self.image_dir is not None:
            image.save(self.image_dir / name, format="PNG")
        return name


def _stage2_conversation(rng: random.Random, images: _ImageStore) -> tuple[Conversation, list[Turn]]:
    """A conversation whose turns are stage-2 turns, their images drawn into ``images``."""
    turns: list[Turn] = []

    def write(role: str, content: str, scenes: Sequence[Scene]) -> None:
        turns.append(
            {
                "role": role,
                "content": content,
                "image_list": [images.save(scene, rng) for scene in scenes],
                "caption_list": [caption(scene) for scene in scenes],
            }
        )

    return Conversation(rng, write), turns


def _describe_segment(conversation: Conversation) -> None:
    dialogue.describe_turns(conversation, random_scene(conversation.rng))


def _question_segment(conversation: Conversation) -> None:
    dialogue.question_turns(conversation, random_scene(conversation.rng))


def _comparison_pair(rng: random.Random, kind: str) -> tuple[Scene, Scene]:
    """Two single-object scenes; for "same_*" kinds the attribute agrees half of the time."""
    first = random_scene(rng, layout="single")
    second_object = random_object(rng)
    attribute = {"same_shape": "shape", "same_colour": "colour", "same_size": "size", "larger": "size"}.get(kind)
    if attribute is not None:
        values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}[attribute]
        current = getattr(first.objects[0], attribute)
        same = kind != "larger" and rng.random() < 0.5
        value = current if same else rng.choice([option for option in values if option != current])
        fields = vars(second_object) | {attribute: value}
        second_object = ShapeObject(**fields)
    if kind == "describe_both" and rng.random() < 0.5:
        return random_scene(rng), random_scene(rng)
    return first, Scene(objects=(second_object,), layout="single")


def _comparison_segment(conversation: Conversation) -> None:
    rng = conversation.rng
    first_kind = rng.choice(dialogue.COMPARISON_KINDS)
    first, second = _comparison_pair(rng, first_kind)
    dialogue.comparison_turns(conversation, first_kind, first, second)


def _edit_pair(conversation: Conversation) -> None:
    """One edit of the latest image: the user asks for it, the assistant draws the edited scene."""
    assert conversation.latest_scene is not None
    instruction, edited = dialogue.random_edit(conversation.rng, conversation.latest_scene)
    dialogue.edit_turns(conversation, instruction, edited)


# How many edits follow a drawing (0, 1, 2, 3), relatively.
EDIT_COUNT_WEIGHTS = (3.0, 3.5, 2.0, 1.5)


def _draw_segment(conversation: Conversation, edit_count_weights: Sequence[float] = EDIT_COUNT_WEIGHTS) -> None:
    rng = conversation.rng
    dialogue.draw_turns(conversation, random_scene(rng))
    for _ in range(rng.choices([0, 1, 2, 3], weights=edit_count_weights)[0]):
        _edit_pair(conversation)
    if rng.random() < 0.2:  # ask about what was just drawn
        dialogue.followup_question_turns(conversation)


_SEGMENTS: dict[str, tuple[Callable[[Conversation], None], float]] = {
    "describe": (_describe_segment, 2.0),
    "question": (_question_segment, 2.0),
    "compare": (_comparison_segment, 1.5),
    "draw": (_draw_segment, 3.0),
}
_SYSTEM_PROMPTS = (
    "You are a helpful assistant that can see images and draw pictures.",
    "You are an assistant in a world of coloured shapes. Answer briefly and draw when asked.",
    "You can look at pictures of shapes and draw new ones.",
)


def _conversation_record(
    rng: random.Random, images: _ImageStore, image_dir: str, kinds: list[tuple[str, ...]] | None = None,
    mixture: Mixture | None = None,
) -> Record:
    """One stage-2 record; its exchange kinds are appended to ``kinds`` when given."""
    conversation, turns = _stage2_conversation(rng, images)
    if rng.random() < 0.1:
        turns.append(
            {"role": "system", "content": rng.choice(_SYSTEM_PROMPTS), "image_list": [], "caption_list": []}
        )
    names = list(_SEGMENTS)
    weights = [weight for _, weight in _SEGMENTS.values()] if mixture is None else list(mixture.segment_weights)
    edit_counts = EDIT_COUNT_WEIGHTS if mixture is None else mixture.edit_count_weights
    for _ in range(rng.choices([1, 2, 3], weights=[55, 30, 15])[0]):
        segment, _ = _SEGMENTS[rng.choices(names, weights=weights)[0]]
        if segment is _draw_segment:
            _draw_segment(conversation, edit_counts)
        else:
            segment(conversation)
        # After looking at a user image, sometimes ask for a modified copy of it.
        if segment in (_describe_segment, _question_segment) and rng.random() < 0.25:
            _edit_pair(conversation)
    if kinds is not None:
        kinds.append(tuple(conversation.kinds))
    return {"conversation": turns, "image_dir": image_dir}


def write_stage2_json(
    out_path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    num_conversations: int,
    seed: int,
    image_size: int = 64,
    progress: bool = False,
) -> int:
    """Write ``num_conversations`` stage-2 records to ``out_path`` and their images to ``image_dir``.

    The file is a JSON list of records in the stage-2 format (DESIGN.md section 3)::

        {"conversation": [
            {"role": "user", "content": "What colour is the circle? <image>",
             "image_list": ["000000.png"], "caption_list": ["a small red circle"]},
            {"role": "assistant", "content": "It is red.", "image_list": [], "caption_list": []},
            {"role": "user", "content": "Draw a large blue square.", "image_list": [], "caption_list": []},
            {"role": "assistant", "content": "Here it is: <image>",
             "image_list": ["000001.png"], "caption_list": ["a large blue square"]}],
         "image_dir": "<image_dir as given>"}

    A record may open with ``{"role": "system", "content": ...}`` (empty lists); then roles
    alternate user/assistant and end with the assistant. Each turn's content holds one ``<image>``
    marker per entry of ``image_list``; ``caption_list`` holds each image's caption (of the grammar
    in ``textbind.toy.world``). Conversations mix descriptions, attribute questions, two-image
    comparisons, drawing requests and multi-turn edits of the latest image. Images are PNG files
    named ``NNNNNN.png``. Returns the number of images written.
    """
    directory = Path(image_dir)
    images = _ImageStore(directory, image_size)
    rng = stream_rng(seed, STAGE2_STREAM)
    records = [
        _conversation_record(rng, images, str(image_dir))
        for _ in tqdm(range(num_conversations), desc="stage-2 conversations", disable=not progress)
    ]
    _write_json_list(Path(out_path), records)
    return images.count


@dataclass(frozen=True)
class Mixture:
    """Relative weights of the segments (describe, question, compare, draw) and of a drawing's edit count
    (0, 1, 2, 3) in the synthetic writer's conversations."""

    segment_weights: tuple[float, float, float, float] = (2.0, 2.0, 1.5, 3.0)
    edit_count_weights: tuple[float, ...] = EDIT_COUNT_WEIGHTS


class _CaptionStore:
    """Names each image by its caption and draws nothing: conversations for text-only use."""

    def save(self, scene: Scene, rng: random.Random) -> str:
        return caption(scene)


def text_records(rng: random.Random, num_conversations: int, mixture: Mixture | None = None) -> list[Record]:
    """Stage-2 records of the synthetic writer whose ``image_list`` entries are the images' captions
    (nothing drawn): the toy world's language, for its tokenizer and its language model's pretraining."""
    store = _CaptionStore()
    return [
        _conversation_record(rng, store, "", mixture=mixture)  # type: ignore[arg-type]
        for _ in range(num_conversations)
    ]


def stage2_exchange_kinds(num_conversations: int, seed: int, image_size: int = 64) -> list[tuple[str, ...]]:
    """The exchange kinds (``dialogue.EXCHANGE_KINDS``) of each conversation ``write_stage2_json`` writes."""
    rng = stream_rng(seed, STAGE2_STREAM)
    images = _ImageStore(None, image_size)
    kinds: list[tuple[str, ...]] = []
    for _ in range(num_conversations):
        _conversation_record(rng, images, "", kinds)
    return kinds


# ---------------------------------------------------------------------------------------------
# Image-caption pairs for the data engine


def write_pairs(
    out_dir: str | os.PathLike[str],
    num_pairs: int,
    seed: int,
    image_size: int = 64,
    family_sizes: Sequence[int] = (2, 3, 4, 5),
    progress: bool = False,
) -> Path:
    """Write ``num_pairs`` image-caption pairs for the data engine; return the path of their JSONL file.

    ``out_dir/pairs.jsonl`` holds one ``{"image": "images/KEY.png", "caption": ..., "key": KEY, "group":
    "family-NNNNNN"}`` per line (the image path is relative to the file); ``KEY`` is the pair's index in nine
    digits, ``group`` its family (below), numbered from 1.

    Pairs come in families, like the photos of one subject in a real collection: a random scene, then
    a walk of ``random_edit`` steps from it (a family of n scenes, n drawn from ``family_sizes``, no
    scene twice), each drawn with its own jitter. Images that look alike are then often one edit apart,
    which is what lets the toy conversation writer turn the images of one topic cluster into
    drawing-and-editing conversations. The pairs draw from their own random stream (``PAIRS_STREAM``),
    apart from the stage-1 shards, the synthetic stage-2 conversations and the evaluation sets.
    """
    if num_pairs < 1:
        raise ValueError("num_pairs must be positive")
    directory = Path(out_dir)
    image_directory = directory / "images"
    image_directory.mkdir(parents=True, exist_ok=True)
    rng = stream_rng(seed, PAIRS_STREAM)
    records = []
    bar = tqdm(total=num_pairs, desc="toy pairs", unit="pair", disable=not progress)
    families = 0
    while len(records) < num_pairs:
        family = [random_scene(rng)]
        families += 1
        size = rng.choice(list(family_sizes))
        for _ in range(8 * size):  # a few tries more than needed: a step may come back to a scene of the family
            if len(family) >= size:
                break
            _, edited = dialogue.random_edit(rng, family[-1])
            if edited not in family:
                family.append(edited)
        for scene in family[: num_pairs - len(records)]:
            key = f"{len(records):09d}"
            draw_scene(scene, image_size=image_size, rng=rng).save(image_directory / f"{key}.png", format="PNG")
            records.append({"image": f"images/{key}.png", "caption": caption(scene), "key": key,
                            "group": f"family-{families:06d}"})
            bar.update(1)
    bar.close()
    path = directory / "pairs.jsonl"
    atomic_write_jsonl(path, records)
    return path


# ---------------------------------------------------------------------------------------------
# Held-out evaluation sets


def write_eval_sets(
    out_dir: str | os.PathLike[str],
    num_describe: int,
    num_draw: int,
    seed: int,
    image_size: int = 64,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the held-out evaluation sets to ``out_dir``; return ``{"describe": path, "draw": path}``.

    They draw from their own random stream (``EVAL_STREAM``), unrelated to the training streams.
    Images go to ``out_dir/images``.

    ``describe.json``: a list of ``{"image": "images/describe_00000.png", "scene": caption}``; the
    image path is relative to ``out_dir`` and ``scene`` is the grammar caption of what it shows
    (score a model's description with ``world.scene_attributes_match(parse_caption(scene), text)``).

    ``draw.json``: a list of stage-2 records (same turn format as ``write_stage2_json``) whose
    conversation ends with a user turn asking for a drawing or for an edit of the latest image,
    plus ``"expected_caption"``, the caption of the image the assistant should draw next::

        {"conversation": [{"role": "user", "content": "Draw a small red circle.", ...},
                          {"role": "assistant", "content": "Here it is: <image>",
                           "image_list": ["draw_000000.png"], "caption_list": ["a small red circle"]},
                          {"role": "user", "content": "Now make it green.", ...}],
         "image_dir": "<out_dir>/images", "expected_caption": "a small green circle"}

    Kinds: a plain drawing request (40%), a drawing followed by 1-3 edits (45%), and a request to
    redraw a described user image with one change (15%).
    """
    directory = Path(out_dir)
    image_directory = directory / "images"
    image_directory.mkdir(parents=True, exist_ok=True)
    rng = stream_rng(seed, EVAL_STREAM)

    describe_records = []
    for index in tqdm(range(num_describe), desc="eval describe", disable=not progress):
        scene = random_scene(rng)
        name = f"describe_{index:05d}.png"
        draw_scene(scene, image_size=image_size, rng=rng).save(image_directory / name, format="PNG")
        describe_records.append({"image": f"images/{name}", "scene": caption(scene)})

    images = _ImageStore(image_directory, image_size, prefix="draw_")
    draw_records = []
    for _ in tqdm(range(num_draw), desc="eval draw", disable=not progress):
        conversation, turns = _stage2_conversation(rng, images)
        kind = rng.choices(["draw", "edit", "redraw"], weights=[40, 45, 15])[0]
        if kind == "redraw":
            _describe_segment(conversation)
        elif kind == "edit":
            scene = random_scene(rng)
            dialogue.draw_turns(conversation, scene)
            for _ in range(rng.choice([0, 0, 1, 2])):
                _edit_pair(conversation)
        if kind == "draw":
            expected = random_scene(rng)
            conversation.user(dialogue.draw_request(rng, expected))
        else:
            assert conversation.latest_scene is not None
            instruction, expected = dialogue.random_edit(rng, conversation.latest_scene)
            conversation.user(dialogue.edit_request(rng, instruction, conversation.latest_is_drawn))
        draw_records.append(
            {
                "conversation": turns,
                "image_dir": str(image_directory),
                "expected_caption": caption(expected),
            }
        )

    paths = {"describe": directory / "describe.json", "draw": directory / "draw.json"}
    _write_json_list(paths["describe"], describe_records)
    _write_json_list(paths["draw"], draw_records)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> None:
    """Write the toy world's stage-1 shards, stage-2 conversations and evaluation sets."""
    parser = argparse.ArgumentParser(prog="python -m textbind.toy.datagen", description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-samples", type=int, default=20_000)
    parser.add_argument("--samples-per-shard", type=int, default=1_000)
    parser.add_argument("--stage2-conversations", type=int, default=5_000)
    parser.add_argument(
        "--pairs", type=int, default=0, help="image-caption pairs for the data engine (out/pairs/pairs.jsonl)"
    )
    parser.add_argument("--eval-describe", type=int, default=200)
    parser.add_argument("--eval-draw", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--image-extension",
        choices=IMAGE_EXTENSIONS,
        default="png",
        help="stage-1 image format (png avoids JPEG artefacts on small canvases)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    arguments = parser.parse_args(argv)
    progress = not arguments.no_progress
    out = arguments.out

    if arguments.stage1_samples > 0:
        pattern = write_stage1_shards(
            out / "stage1",
            arguments.stage1_samples,
            arguments.samples_per_shard,
            arguments.seed,
            image_size=arguments.image_size,
            image_extension=arguments.image_extension,
            progress=progress,
        )
        print(f"stage 1: {arguments.stage1_samples} image-caption pairs in {pattern}")
    if arguments.stage2_conversations > 0:
        train_path, image_dir = out / "stage2" / "train.json", out / "stage2" / "images"
        image_count = write_stage2_json(
            train_path,
            image_dir,
            arguments.stage2_conversations,
            arguments.seed,
            image_size=arguments.image_size,
            progress=progress,
        )
        print(
            f"stage 2: {arguments.stage2_conversations} conversations in {train_path}, "
            f"{image_count} images in {image_dir}"
        )
    if arguments.pairs > 0:
        path = write_pairs(
            out / "pairs", arguments.pairs, arguments.seed, image_size=arguments.image_size, progress=progress
        )
        print(f"pairs: {arguments.pairs} image-caption pairs in {path}")
    if arguments.eval_describe > 0 or arguments.eval_draw > 0:
        paths = write_eval_sets(
            out / "eval",
            arguments.eval_describe,
            arguments.eval_draw,
            arguments.seed,
            image_size=arguments.image_size,
            progress=progress,
        )
        print(
            f"eval: {arguments.eval_describe} describe items in {paths['describe']}, "
            f"{arguments.eval_draw} draw items in {paths['draw']}"
        )


if __name__ == "__main__":
    main()
