"""The toy world's conversation phrases: descriptions, questions, comparisons, drawing requests and edits.

Shared by the two writers of toy conversations: the synthetic stage-2 writer
(``textbind.toy.datagen``), which invents its scenes, and the scripted toy LLM
(``textbind.toy.writer``), which is given its scenes as captions and writes a transcript. Both
append whole (user, assistant) pairs to a ``Conversation`` through the ``*_turns`` functions; a
``Conversation`` hands each turn to a sink (stage-2 turns with image files, or transcript lines), so
both writers speak exactly the same grammar.

Every phrase is drawn from the ``random.Random`` it is given, in a fixed order: the same stream
gives the same text.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from textbind import IMAGE_TOKEN
from textbind.toy.world import (
    COLOURS,
    LAYOUT_POSITIONS,
    SHAPES,
    Layout,
    Scene,
    ShapeObject,
    all_objects,
    caption,
    random_object,
)

LAYOUT_OF_POSITION: dict[str, Layout] = {
    "left": "horizontal",
    "right": "horizontal",
    "top": "vertical",
    "bottom": "vertical",
}
PLURAL_SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COMPARISON_KINDS = ("same_shape", "same_colour", "same_size", "larger", "describe_both")
# Kinds of (user, assistant) exchanges, as recorded in ``Conversation.kinds``.
EXCHANGE_KINDS = ("describe", "question", "compare", "draw", "edit", "redraw")
DESCRIBE_PROMPTS = (
    "Describe this image.",
    "What is in this picture?",
    "What do you see?",
    "Can you describe the image?",
    "Caption this image.",
    "What does this image show?",
)

# role, content (with one IMAGE_TOKEN per scene), scenes
TurnSink = Callable[[str, str, Sequence[Scene]], None]


def sentence(text: str) -> str:
    """``text`` with its first letter in upper case."""
    return text[0].upper() + text[1:]


class Conversation:
    """The turns of one conversation as they are written, and the latest image's scene.

    ``sink`` receives each turn (role, content, scenes); ``kinds`` records the kind of each
    (user, assistant) exchange (one of ``EXCHANGE_KINDS``).
    """

    def __init__(self, rng: random.Random, sink: TurnSink) -> None:
        self.rng = rng
        self.sink = sink
        self.latest_scene: Scene | None = None
        self.latest_is_drawn = False  # whether the latest image was drawn by the assistant
        self.kinds: list[str] = []

    def add(self, role: str, content: str, scenes: Sequence[Scene] = ()) -> None:
        if content.count(IMAGE_TOKEN) != len(scenes):
            raise AssertionError(f"{content!r} has {content.count(IMAGE_TOKEN)} markers for {len(scenes)} images")
        self.sink(role, content, scenes)
        if scenes:
            self.latest_scene = scenes[-1]
            self.latest_is_drawn = role == "assistant"

    def user(self, content: str, scenes: Sequence[Scene] = ()) -> None:
        self.add("user", content, scenes)

    def assistant(self, content: str, scenes: Sequence[Scene] = ()) -> None:
        self.add("assistant", content, scenes)


def with_images(rng: random.Random, text: str, count: int) -> str:
    """``text`` with ``count`` image markers before or after it."""
    if count == 1:
        return rng.choice([f"{text} {IMAGE_TOKEN}", f"{IMAGE_TOKEN} {text}", f"{IMAGE_TOKEN}\n{text}"])
    markers = " ".join([IMAGE_TOKEN] * count)
    numbered = " ".join(f"Image {index + 1}: {IMAGE_TOKEN}" for index in range(count))
    return rng.choice([f"{text} {markers}", f"{markers} {text}", f"{numbered}\n{text}"])


def reference(scene: Scene, index: int, rng: random.Random, exclude: Iterable[str] = ()) -> str | None:
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


def describe_answer(rng: random.Random, scene: Scene) -> str:
    """A one-sentence description of ``scene`` holding its caption."""
    text = caption(scene)
    template = rng.choice(["{caption}.", "The image shows {caption}.", "I see {caption}.", "There is {caption}."])
    return sentence(template.format(caption=text))


def random_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A question about one image of ``scene`` and its correct answer."""
    kinds = ["colour", "shape", "size", "count", "exists", "is_colour"]
    if scene.layout != "single":
        kinds += ["position", "position"]
    while True:
        kind = rng.choice(kinds)
        index = rng.randrange(len(scene.objects))
        item = scene.objects[index]
        exclude = {"colour": {"colour"}, "is_colour": {"colour"}, "shape": {"shape"}, "size": {"size"}}
        phrase = reference(scene, index, rng, exclude.get(kind, {"position"}))
        if phrase is None:
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
                answer = f"Yes, there are two {asked.colour} {PLURAL_SHAPES[asked.shape]}."
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
        question = sentence(question.format(ref=phrase))
        return question, answer.format(value=value, Value=sentence(value))


# ---------------------------------------------------------------------------------------------
# Edits


@dataclass(frozen=True)
class Edit:
    """One edit of a scene: its kind, the object it applies to and (for some kinds) the new value.

    ``value`` is a colour, size or shape name for "colour", "size" and "shape"; ``(object,
    position)`` for "add"; ``None`` for "swap", "layout" and "remove".
    """

    kind: str
    index: int
    value: object = None


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene ``edit`` (with its value set, for the kinds that take one) makes of ``scene``."""
    kind, index, value = edit.kind, edit.index, edit.value
    item = scene.objects[index]
    objects = list(scene.objects)
    if kind in ("colour", "shape"):
        objects[index] = ShapeObject(**(vars(item) | {kind: str(value)}))
    elif kind == "size":
        objects[index] = ShapeObject(**(vars(item) | {"size": "large" if item.size == "small" else "small"}))
    elif kind == "add":
        added, position = value  # type: ignore[misc]
        layout = LAYOUT_OF_POSITION[position]
        ordered = [added, item] if LAYOUT_POSITIONS[layout][0] == position else [item, added]
        return Scene(objects=tuple(ordered), layout=layout)
    elif kind == "swap":
        return Scene(objects=tuple(reversed(objects)), layout=scene.layout)
    elif kind == "layout":
        ordered = objects if index == 0 else list(reversed(objects))
        return Scene(objects=tuple(ordered), layout="vertical" if scene.layout == "horizontal" else "horizontal")
    elif kind == "remove":
        return Scene(objects=(scene.objects[1 - index],), layout="single")
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return Scene(objects=tuple(objects), layout=scene.layout)


def edit_instruction(rng: random.Random, scene: Scene, edit: Edit, phrase: str | None) -> tuple[str, Scene]:
    """An imperative instruction (lower case, no full stop) for ``edit`` of ``scene``, and the scene it gives.

    ``phrase`` refers to the edited object (``reference(scene, edit.index, rng)``). A ``None``
    value is drawn from ``rng`` for the kinds that take one.
    """
    kind, index, value = edit.kind, edit.index, edit.value
    item = scene.objects[index]
    if value is None and kind == "colour":
        value = rng.choice([colour for colour in COLOURS if colour != item.colour])
    elif value is None and kind == "shape":
        value = rng.choice([shape for shape in SHAPES if shape != item.shape])
    elif value is None and kind == "add":
        added = random_object(rng)
        value = (added, rng.choice(list(LAYOUT_OF_POSITION)))
    result = apply_edit(scene, Edit(kind, index, value))
    if kind == "colour":
        template = rng.choice(
            [
                "make {ref} {value}",
                "colour {ref} {value}",
                "paint {ref} {value}",
                "change {ref} to {value}",
            ]
        )
    elif kind == "size":
        value = result.objects[index].size
        comparative = "bigger" if value == "large" else "smaller"
        template = rng.choice(["make {ref} {value}", f"make {{ref}} {comparative}"])
    elif kind == "shape":
        template = rng.choice(
            ["turn {ref} into a {value}", "make {ref} a {value} instead", "change {ref} into a {value}"]
        )
    elif kind == "add":
        added, position = value  # type: ignore[misc]
        instruction = rng.choice(
            [
                f"add {{value}} on the {position}",
                f"also draw {{value}} on the {position}",
                f"put {{value}} on the {position}",
            ]
        ).format(value=added.phrase())
        return instruction, result
    elif kind == "swap":
        new_position = scene.positions[1 - index]
        instruction = rng.choice(
            ["swap the two shapes", "swap their positions", f"move {phrase} to the {new_position}"]
        )
        return instruction, result
    elif kind == "layout":
        first_position = scene.positions[index]
        if scene.layout == "horizontal":
            options = [
                f"stack them vertically, with the {first_position} one on top",
                f"put the {first_position} one on the top and the other one on the bottom",
            ]
        else:
            options = [
                f"put them side by side, with the {first_position} one on the left",
                f"put the {first_position} one on the left and the other one on the right",
            ]
        return rng.choice(options), result
    else:  # remove
        kept_reference = reference(scene, 1 - index, rng)
        instruction = rng.choice(
            [
                f"remove {phrase}",
                f"take away {phrase}",
                f"delete {phrase}",
                f"keep only {kept_reference}",
            ]
        )
        return instruction, result
    return template.format(ref=phrase, value=value), result


def random_edit(rng: random.Random, scene: Scene) -> tuple[str, Scene]:
    """An imperative edit instruction (lower case, no full stop) and the scene it produces."""
    kinds = ["colour", "colour", "size", "shape"]
    kinds += ["add"] if scene.layout == "single" else ["swap", "layout", "remove"]
    while True:
        kind = rng.choice(kinds)
        index = rng.randrange(len(scene.objects))
        phrase = reference(scene, index, rng)
        assert phrase is not None  # the position is never excluded here
        if kind == "swap" and scene.objects[0] == scene.objects[1]:
            continue
        return edit_instruction(rng, scene, Edit(kind, index), phrase)


@functools.lru_cache(maxsize=8192)
def possible_edits(scene: Scene) -> tuple[tuple[Edit, Scene], ...]:
    """Every edit ``random_edit`` can make of ``scene``, with the scene each one gives."""
    edits: list[Edit] = []
    for index, item in enumerate(scene.objects):
        edits += [Edit("colour", index, colour) for colour in COLOURS if colour != item.colour]
        edits.append(Edit("size", index))
        edits += [Edit("shape", index, shape) for shape in SHAPES if shape != item.shape]
        if scene.layout == "single":
            edits += [
                Edit("add", index, (added, position)) for added in all_objects() for position in LAYOUT_OF_POSITION
            ]
        else:
            if scene.objects[0] != scene.objects[1]:
                edits.append(Edit("swap", index))
            edits += [Edit("layout", index), Edit("remove", index)]
    return tuple((edit, apply_edit(scene, edit)) for edit in edits)


def edits_between(scene: Scene, target: Scene) -> list[Edit]:
    """The single edits that turn ``scene`` into ``target`` (empty when none does)."""
    return [edit for edit, result in possible_edits(scene) if result == target]


def edit_towards(rng: random.Random, scene: Scene, target: Scene) -> str | None:
    """An instruction (as ``random_edit`` writes them) that turns ``scene`` into ``target``, or ``None``."""
    edits = edits_between(scene, target)
    if not edits:
        return None
    edit = rng.choice(edits)
    phrase = reference(scene, edit.index, rng)
    instruction, result = edit_instruction(rng, scene, edit, phrase)
    assert result == target, (instruction, caption(result), caption(target))
    return instruction


def edit_request(rng: random.Random, instruction: str, latest_is_drawn: bool) -> str:
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
    return template.format(instruction=instruction, Instruction=sentence(instruction))


def draw_request(rng: random.Random, scene: Scene) -> str:
    """The user's request to draw ``scene``, naming its caption."""
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


def image_answer(rng: random.Random, scene: Scene, edited: bool) -> str:
    """The assistant's answer that shows a drawn (or edited) image: one image marker."""
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
    return sentence(rng.choice(choices).format(image=IMAGE_TOKEN, caption=caption(scene)))


def comparison_answer(rng: random.Random, kind: str, first: Scene, second: Scene) -> tuple[str, str]:
    """A question of ``kind`` (one of ``COMPARISON_KINDS``) about two images and its correct answer.

    Every kind but "describe_both" compares two single-object scenes.
    """
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
        both = PLURAL_SHAPES[first_value]
        first_value, second_value = f"a {first_value}", f"a {second_value}"
    else:
        both = first_value
    if first_value == second_value:
        return rng.choice(question), f"Yes, both are {both}."
    return rng.choice(question), f"No, the first is {first_value} and the second is {second_value}."


# ---------------------------------------------------------------------------------------------
# Exchanges: each appends whole (user, assistant) pairs about the scenes it is given


def describe_turns(conversation: Conversation, scene: Scene) -> None:
    """The user shows ``scene`` and asks for a description."""
    rng = conversation.rng
    conversation.user(with_images(rng, rng.choice(DESCRIBE_PROMPTS), 1), [scene])
    conversation.assistant(describe_answer(rng, scene))
    conversation.kinds.append("describe")


def question_turns(conversation: Conversation, scene: Scene) -> None:
    """The user shows ``scene`` and asks one to three questions about it."""
    rng = conversation.rng
    for question_index in range(rng.choice([1, 1, 2, 3])):
        question, answer = random_question(rng, scene)
        if question_index == 0:
            conversation.user(with_images(rng, question, 1), [scene])
        else:
            conversation.user(question)
        conversation.assistant(answer)
        conversation.kinds.append("question")


def followup_question_turns(conversation: Conversation) -> None:
    """The user asks a question about the latest image (already in the conversation)."""
    assert conversation.latest_scene is not None
    question, answer = random_question(conversation.rng, conversation.latest_scene)
    conversation.user(question)
    conversation.assistant(answer)
    conversation.kinds.append("question")


def comparison_turns(conversation: Conversation, first_kind: str, first: Scene, second: Scene) -> None:
    """The user shows two scenes and asks a ``first_kind`` comparison (two single scenes: maybe a second one)."""
    rng = conversation.rng
    asked = [first_kind]
    if first.layout == "single" and second.layout == "single" and rng.random() < 0.4:
        asked.append(rng.choice([kind for kind in COMPARISON_KINDS if kind != first_kind]))
    for question_index, kind in enumerate(asked):
        question, answer = comparison_answer(rng, kind, first, second)
        if question_index == 0:
            conversation.user(with_images(rng, question, 2), [first, second])
        else:
            conversation.user(rng.choice(["And ", "Also, "]) + question[0].lower() + question[1:])
        conversation.assistant(answer)
        conversation.kinds.append("compare")


def draw_turns(conversation: Conversation, scene: Scene) -> None:
    """The user asks for a drawing of ``scene``; the assistant shows it."""
    rng = conversation.rng
    conversation.user(draw_request(rng, scene))
    conversation.assistant(image_answer(rng, scene, edited=False), [scene])
    conversation.kinds.append("draw")


def edit_turns(conversation: Conversation, instruction: str, edited: Scene) -> None:
    """The user asks for ``instruction`` applied to the latest image; the assistant shows ``edited``."""
    rng = conversation.rng
    drawn = conversation.latest_is_drawn
    conversation.user(edit_request(rng, instruction, drawn))
    conversation.assistant(image_answer(rng, edited, edited=True), [edited])
    conversation.kinds.append("edit" if drawn else "redraw")
