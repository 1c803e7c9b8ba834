"""Synthetic data of the toy shapes world: stage-1 webdataset shards, stage-2 conversations, eval sets.

Everything is a pure function of ``seed``. Each writer draws from its own random stream
(``stream_rng(seed, name)``), so stage 1, stage 2 and the held-out evaluation sets never share a
sequence of scenes, even for neighbouring seeds.

Command line::

    python -m textbind.toy.datagen --out data/toy --seed 0 \\
        --stage1-samples 20000 --stage2-conversations 5000 --eval-describe 200 --eval-draw 200

writes ``data/toy/stage1/{00000..}.tar``, ``data/toy/stage2/train.json`` with
``data/toy/stage2/images/`` and ``data/toy/eval/{describe,draw}.json`` with ``data/toy/eval/images/``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import webdataset
from PIL import Image
from tqdm import tqdm

from textbind import IMAGE_TOKEN
from textbind.toy.world import (
    COLOURS,
    LAYOUT_POSITIONS,
    SHAPES,
    SIZES,
    Layout,
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
IMAGE_EXTENSIONS = ("png", "jpg")
_LAYOUT_OF_POSITION: dict[str, Layout] = {
    "left": "horizontal",
    "right": "horizontal",
    "top": "vertical",
    "bottom": "vertical",
}
_PLURAL_SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles"}


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
    """Write ``records`` as a JSON list, one record per line, atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write("[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n")
    os.replace(temporary, path)


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
        temporary = path.with_name(path.name + ".tmp")
        first, last = shard_index * samples_per_shard, min(num_samples, (shard_index + 1) * samples_per_shard)
        with webdataset.TarWriter(str(temporary), encoder=False, mtime=0) as writer:
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
        os.replace(temporary, path)
    bar.close()
    return f"{directory}/{{00000..{num_shards - 1:05d}}}.tar"


# ---------------------------------------------------------------------------------------------
# Conversation building blocks


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


class _ImageStore:
    """Draws scenes into ``image_dir`` as numbered PNG files."""

    def __init__(self, image_dir: Path, image_size: int, prefix: str = "") -> None:
        self.image_dir = image_dir
        self.image_size = image_size
        self.prefix = prefix
        self.count = 0
        image_dir.mkdir(parents=True, exist_ok=True)

    def save(self, scene: Scene, rng: random.Random) -> str:
        name = f"{self.prefix}{self.count:06d}.png"
        self.count += 1
        draw_scene(scene, image_size=self.image_size, rng=rng).save(self.image_dir / name, format="PNG")
        return name


class _Conversation:
    """Accumulates the turns of one stage-2 record and remembers the latest image's scene."""

    def __init__(self, rng: random.Random, images: _ImageStore) -> None:
        self.rng = rng
        self.images = images
        self.turns: list[Turn] = []
        self.latest_scene: Scene | None = None
        self.latest_is_drawn = False  # whether the latest image was drawn by the assistant

    def add(self, role: str, content: str, scenes: Sequence[Scene] = ()) -> None:
        if content.count(IMAGE_TOKEN) != len(scenes):
            raise AssertionError(f"{content!r} has {content.count(IMAGE_TOKEN)} markers for {len(scenes)} images")
        self.turns.append(
            {
                "role": role,
                "content": content,
                "image_list": [self.images.save(scene, self.rng) for scene in scenes],
                "caption_list": [caption(scene) for scene in scenes],
            }
        )
        if scenes:
            self.latest_scene = scenes[-1]
            self.latest_is_drawn = role == "assistant"

    def user(self, content: str, scenes: Sequence[Scene] = ()) -> None:
        self.add("user", content, scenes)

    def assistant(self, content: str, scenes: Sequence[Scene] = ()) -> None:
        self.add("assistant", content, scenes)


def _with_images(rng: random.Random, text: str, count: int) -> str:
    """``text`` with ``count`` image markers before or after it."""
    if count == 1:
        return rng.choice([f"{text} {IMAGE_TOKEN}", f"{IMAGE_TOKEN} {text}", f"{IMAGE_TOKEN}\n{text}"])
    markers = " ".join([IMAGE_TOKEN] * count)
    numbered = " ".join(f"Image {index + 1}: {IMAGE_TOKEN}" for index in range(count))
    return rng.choice([f"{text} {markers}", f"{markers} {text}", f"{numbered}\n{text}"])


def _reference(scene: Scene, index: int, rng: random.Random, exclude: Iterable[str] = ()) -> str | None:
    """A noun phrase that picks out object ``index`` of ``scene`` without the attributes in ``exclude``.

    Attributes are "colour", "shape", "size" and "position". Returns ``None`` when no phrase is
    unique (two identical objects and the position excluded).
    """
    excluded = set(exclude)
    item = scene.objects[index]
    if scene.layout == "single":
        candidates = ["it", "the shape"]
        if "shape" not in excluded:
            candidates.append(f"the {item.shape}")
        if "colour" not in excluded and "shape" not in excluded:
            candidates.append(f"the {item.colour} {item.shape}")
        return rng.choice(candidates)
    other = scene.objects[1 - index]
    position = scene.positions[index]
    options: list[tuple[set[str], bool, list[str]]] = [
        ({"shape"}, item.shape != other.shape, [f"the {item.shape}"]),
        ({"colour"}, item.colour != other.colour, [f"the {item.colour} one", f"the {item.colour} shape"]),
        ({"size"}, item.size != other.size, [f"the {item.size} one", f"the {item.size} shape"]),
        (
            {"colour", "shape"},
            (item.colour, item.shape) != (other.colour, other.shape),
            [f"the {item.colour} {item.shape}"],
        ),
        (
            {"size", "shape"},
            (item.size, item.shape) != (other.size, other.shape),
            [f"the {item.size} {item.shape}"],
        ),
        ({"position"}, True, [f"the shape on the {position}", f"the one on the {position}"]),
    ]
    candidates = [phrase for used, unique, phrases in options if unique and not used & excluded for phrase in phrases]
    return rng.choice(candidates) if candidates else None


def _describe_answer(rng: random.Random, scene: Scene) -> str:
    text = caption(scene)
    template = rng.choice(["{caption}.", "The image shows {caption}.", "I see {caption}.", "There is {caption}."])
    return _sentence(template.format(caption=text))


def _random_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A question about one image of ``scene`` and its correct answer."""
    kinds = ["colour", "shape", "size", "count", "exists", "is_colour"]
    if scene.layout != "single":
        kinds += ["position", "position"]
    while True:
        kind = rng.choice(kinds)
        index = rng.randrange(len(scene.objects))
        item = scene.objects[index]
        exclude = {"colour": {"colour"}, "is_colour": {"colour"}, "shape": {"shape"}, "size": {"size"}}
        reference = _reference(scene, index, rng, exclude.get(kind, {"position"}))
        if reference is None:
            continue
        if kind == "colour":
            question = rng.choice(
                ["What colour is {ref}?", "Which colour does {ref} have?", "What is the colour of {ref}?"]
            )
            answer = rng.choice(["It is {value}.", "It's {value}.", "{Value}."])
            value = item.colour
        elif kind == "shape":
            question = rng.choice(["What shape is {ref}?", "What kind of shape is {ref}?"])
            answer = rng.choice(["It is a {value}.", "It's a {value}.", "A {value}."])
            value = item.shape
        elif kind == "size":
            question = rng.choice(["Is {ref} small or large?", "How big is {ref}?", "What size is {ref}?"])
            answer = rng.choice(["It is {value}.", "It's {value}.", "{Value}."])
            value = item.size
        elif kind == "position":
            question = rng.choice(["Where is {ref}?", "Where is {ref} placed?"])
            answer = rng.choice(["It is on the {value}.", "On the {value}."])
            value = scene.positions[index] or ""
        elif kind == "count":
            question = rng.choice(["How many shapes are there?", "How many shapes are in the image?"])
            answer = "There is one shape." if scene.layout == "single" else "There are two shapes."
            return question, answer
        elif kind == "exists":
            asked = item if rng.random() < 0.5 else random_object(rng)
            present = [obj for obj in scene.objects if (obj.colour, obj.shape) == (asked.colour, asked.shape)]
            question = rng.choice(["Is there a {colour} {shape}?", "Is there a {colour} {shape} in the image?"])
            question = question.format(colour=asked.colour, shape=asked.shape)
            if len(present) == 2:
                answer = f"Yes, there are two {asked.colour} {_PLURAL_SHAPES[asked.shape]}."
            elif present:
                answer = f"Yes, there is {present[0].phrase()}."
            else:
                answer = f"No, there is no {asked.colour} {asked.shape}."
            return question, answer
        else:  # is_colour: a yes/no question, true half of the time
            asked_colour = item.colour if rng.random() < 0.5 else rng.choice(list(COLOURS))
            question = f"Is {{ref}} {asked_colour}?"
            answer = "Yes, it is." if asked_colour == item.colour else "No, it is {value}."
            value = item.colour
        question = _sentence(question.format(ref=reference))
        return question, answer.format(value=value, Value=_sentence(value))


# ---------------------------------------------------------------------------------------------
# Edits


def _random_edit(rng: random.Random, scene: Scene) -> tuple[str, Scene]:
    """An imperative edit instruction (lower case, no full stop) and the scene it produces."""
    kinds = ["colour", "colour", "size", "shape"]
    kinds += ["add"] if scene.layout == "single" else ["swap", "layout", "remove"]
    while True:
        kind = rng.choice(kinds)
        index = rng.randrange(len(scene.objects))
        item = scene.objects[index]
        reference = _reference(scene, index, rng)
        assert reference is not None  # the position is never excluded here
        objects = list(scene.objects)
        if kind == "colour":
            value = rng.choice([colour for colour in COLOURS if colour != item.colour])
            objects[index] = ShapeObject(colour=value, shape=item.shape, size=item.size)
            template = rng.choice(
                [
                    "make {ref} {value}",
                    "colour {ref} {value}",
                    "paint {ref} {value}",
                    "change {ref} to {value}",
                ]
            )
        elif kind == "size":
            value = "large" if item.size == "small" else "small"
            objects[index] = ShapeObject(colour=item.colour, shape=item.shape, size=value)
            comparative = "bigger" if value == "large" else "smaller"
            template = rng.choice(["make {ref} {value}", f"make {{ref}} {comparative}"])
        elif kind == "shape":
            value = rng.choice([shape for shape in SHAPES if shape != item.shape])
            objects[index] = ShapeObject(colour=item.colour, shape=value, size=item.size)
            template = rng.choice(
                ["turn {ref} into a {value}", "make {ref} a {value} instead", "change {ref} into a {value}"]
            )
        elif kind == "add":
            added = random_object(rng)
            position = rng.choice(list(_LAYOUT_OF_POSITION))
            layout = _LAYOUT_OF_POSITION[position]
            ordered = [added, item] if LAYOUT_POSITIONS[layout][0] == position else [item, added]
            instruction = rng.choice(
                [
                    f"add {{value}} on the {position}",
                    f"also draw {{value}} on the {position}",
                    f"put {{value}} on the {position}",
                ]
            ).format(value=added.phrase())
            return instruction, Scene(objects=tuple(ordered), layout=layout)
        elif kind == "swap":
            if scene.objects[0] == scene.objects[1]:
                continue
            new_position = scene.positions[1 - index]
            instruction = rng.choice(
                ["swap the two shapes", "swap their positions", f"move {reference} to the {new_position}"]
            )
            return instruction, Scene(objects=tuple(reversed(objects)), layout=scene.layout)
        elif kind == "layout":
            first_position = scene.positions[index]
            layout: Layout
            if scene.layout == "horizontal":
                layout, instruction = (
                    "vertical",
                    rng.choice(
                        [
                            f"stack them vertically, with the {first_position} one on top",
                            f"put the {first_position} one on the top and the other one on the bottom",
                        ]
                    ),
                )
            else:
                layout, instruction = (
                    "horizontal",
                    rng.choice(
                        [
                            f"put them side by side, with the {first_position} one on the left",
                            f"put the {first_position} one on the left and the other one on the right",
                        ]
                    ),
                )
            ordered = objects if index == 0 else list(reversed(objects))
            return instruction, Scene(objects=tuple(ordered), layout=layout)
        else:  # remove
            kept = scene.objects[1 - index]
            kept_reference = _reference(scene, 1 - index, rng)
            instruction = rng.choice(
                [
                    f"remove {reference}",
                    f"take away {reference}",
                    f"delete {reference}",
                    f"keep only {kept_reference}",
                ]
            )
            return instruction, Scene(objects=(kept,), layout="single")
        return template.format(ref=reference, value=value), Scene(objects=tuple(objects), layout=scene.layout)


def _edit_request(rng: random.Random, instruction: str, latest_is_drawn: bool) -> str:
    """The user's edit request: plain after a drawn image, "draw this again" after a user image."""
    if latest_is_drawn:
        template = rng.choice(
            [
                "{Instruction}.",
                "Now {instruction}.",
                "Can you {instruction}?",
                "Please {instruction}.",
                "Great. Now {instruction}.",
            ]
        )
    else:
        template = rng.choice(
            [
                "Draw this again, but {instruction}.",
                "Redraw this image and {instruction}.",
                "Can you draw it again but {instruction}?",
            ]
        )
    return template.format(instruction=instruction, Instruction=_sentence(instruction))


def _draw_request(rng: random.Random, scene: Scene) -> str:
    template = rng.choice(
        [
            "Draw {caption}.",
            "Can you draw {caption}?",
            "Please draw {caption}.",
            "Show me {caption}.",
            "Generate an image of {caption}.",
            "I would like a picture of {caption}.",
            "Make a picture of {caption}.",
            "Paint {caption}.",
        ]
    )
    return template.format(caption=caption(scene))


def _image_answer(rng: random.Random, scene: Scene, edited: bool) -> str:
    if edited:
        choices = [
            "Here it is: {image}",
            "Done: {image}",
            "Sure! {image}",
            "Here is the new picture: {image}",
            "OK, I changed it. {image}",
        ]
    else:
        choices = [
            "Here it is: {image}",
            "Sure! {image}",
            "Here is {caption}: {image}",
            "{image}",
            "Of course. {image}",
        ]
    return _sentence(rng.choice(choices).format(image=IMAGE_TOKEN, caption=caption(scene)))


# ---------------------------------------------------------------------------------------------
# Conversation segments: each appends whole (user, assistant) pairs


def _describe_segment(conversation: _Conversation) -> None:
    rng = conversation.rng
    scene = random_scene(rng)
    prompt = rng.choice(
        [
            "Describe this image.",
            "What is in this picture?",
            "What do you see?",
            "Can you describe the image?",
            "Caption this image.",
            "What does this image show?",
        ]
    )
    conversation.user(_with_images(rng, prompt, 1), [scene])
    conversation.assistant(_describe_answer(rng, scene))


def _question_segment(conversation: _Conversation) -> None:
    rng = conversation.rng
    scene = random_scene(rng)
    for question_index in range(rng.choice([1, 1, 2, 3])):
        question, answer = _random_question(rng, scene)
        if question_index == 0:
            conversation.user(_with_images(rng, question, 1), [scene])
        else:
            conversation.user(question)
        conversation.assistant(answer)


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


def _comparison_answer(rng: random.Random, kind: str, first: Scene, second: Scene) -> tuple[str, str]:
    if kind == "describe_both":
        question = rng.choice(["Describe these two images.", "What is in each image?", "What do these images show?"])
        return question, f"The first image shows {caption(first)} and the second shows {caption(second)}."
    if kind == "larger":
        question = rng.choice(["Which image shows the larger shape?", "In which image is the shape bigger?"])
        if first.objects[0].size == second.objects[0].size:
            return question, f"Neither, both shapes are {first.objects[0].size}."
        answer = "first" if first.objects[0].size == "large" else "second"
        return question, rng.choice([f"The {answer} one.", f"The {answer} image."])
    attribute = kind.removeprefix("same_")
    question = {
        "shape": ["Do these two images show the same shape?", "Is the shape in both images the same?"],
        "colour": [
            "Are the shapes in these images the same colour?",
            "Do the two shapes have the same colour?",
        ],
        "size": ["Are the two shapes the same size?", "Do the shapes in these images have the same size?"],
    }[attribute]
    first_value, second_value = getattr(first.objects[0], attribute), getattr(second.objects[0], attribute)
    if attribute == "shape":
        both = _PLURAL_SHAPES[first_value]
        first_value, second_value = f"a {first_value}", f"a {second_value}"
    else:
        both = first_value
    if first_value == second_value:
        return rng.choice(question), f"Yes, both are {both}."
    return rng.choice(question), f"No, the first is {first_value} and the second is {second_value}."


def _comparison_segment(conversation: _Conversation) -> None:
    rng = conversation.rng
    kinds = ["same_shape", "same_colour", "same_size", "larger", "describe_both"]
    first_kind = rng.choice(kinds)
    first, second = _comparison_pair(rng, first_kind)
    asked = [first_kind]
    if first.layout == "single" and second.layout == "single" and rng.random() < 0.4:
        asked.append(rng.choice([kind for kind in kinds if kind != first_kind]))
    for question_index, kind in enumerate(asked):
        question, answer = _comparison_answer(rng, kind, first, second)
        if question_index == 0:
            conversation.user(_with_images(rng, question, 2), [first, second])
        else:
            conversation.user(rng.choice(["And ", "Also, "]) + question[0].lower() + question[1:])
        conversation.assistant(answer)


def _edit_pair(conversation: _Conversation) -> None:
    """One edit of the latest image: the user asks for it, the assistant draws the edited scene."""
    rng = conversation.rng
    assert conversation.latest_scene is not None
    instruction, edited = _random_edit(rng, conversation.latest_scene)
    conversation.user(_edit_request(rng, instruction, conversation.latest_is_drawn))
    conversation.assistant(_image_answer(rng, edited, edited=True), [edited])


def _draw_segment(conversation: _Conversation) -> None:
    rng = conversation.rng
    scene = random_scene(rng)
    conversation.user(_draw_request(rng, scene))
    conversation.assistant(_image_answer(rng, scene, edited=False), [scene])
    for _ in range(rng.choices([0, 1, 2, 3], weights=[3, 3.5, 2, 1.5])[0]):
        _edit_pair(conversation)
    if rng.random() < 0.2:  # ask about what was just drawn
        assert conversation.latest_scene is not None
        question, answer = _random_question(rng, conversation.latest_scene)
        conversation.user(question)
        conversation.assistant(answer)


_SEGMENTS: dict[str, tuple[Callable[[_Conversation], None], float]] = {
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


def _conversation_record(rng: random.Random, images: _ImageStore, image_dir: str) -> Record:
    conversation = _Conversation(rng, images)
    if rng.random() < 0.1:
        conversation.turns.append(
            {"role": "system", "content": rng.choice(_SYSTEM_PROMPTS), "image_list": [], "caption_list": []}
        )
    names = list(_SEGMENTS)
    weights = [weight for _, weight in _SEGMENTS.values()]
    for _ in range(rng.choices([1, 2, 3], weights=[55, 30, 15])[0]):
        segment, _ = _SEGMENTS[rng.choices(names, weights=weights)[0]]
        segment(conversation)
        # After looking at a user image, sometimes ask for a modified copy of it.
        if segment in (_describe_segment, _question_segment) and rng.random() < 0.25:
            _edit_pair(conversation)
    return {"conversation": conversation.turns, "image_dir": image_dir}


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
        conversation = _Conversation(rng, images)
        kind = rng.choices(["draw", "edit", "redraw"], weights=[40, 45, 15])[0]
        if kind == "redraw":
            _describe_segment(conversation)
        elif kind == "edit":
            scene = random_scene(rng)
            conversation.user(_draw_request(rng, scene))
            conversation.assistant(_image_answer(rng, scene, edited=False), [scene])
            for _ in range(rng.choice([0, 0, 1, 2])):
                _edit_pair(conversation)
        if kind == "draw":
            expected = random_scene(rng)
            conversation.user(_draw_request(rng, expected))
        else:
            assert conversation.latest_scene is not None
            instruction, expected = _random_edit(rng, conversation.latest_scene)
            conversation.user(_edit_request(rng, instruction, conversation.latest_is_drawn))
        draw_records.append(
            {
                "conversation": conversation.turns,
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
