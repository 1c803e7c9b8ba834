"""The toy shapes world: scenes of one or two coloured shapes, their drawing and their caption grammar.

A scene holds one object (layout ``"single"``, drawn around the centre) or two objects placed
side by side (``"horizontal"``: objects are (left, right)) or one above the other
(``"vertical"``: objects are (top, bottom)). Every object has a size, a colour and a shape.

The caption grammar (all lower case, one space between words)::

    caption  := object
              | object " on the left and " object " on the right"
              | object " on the top and " object " on the bottom"
    object   := "a " size " " colour " " shape

``parse_caption`` also accepts the two-object forms with their halves swapped ("... on the right
and ... on the left"), surrounding whitespace, any letter case, runs of whitespace and one
trailing full stop; it returns the same ``Scene`` either way, so ``parse_caption(caption(s)) == s``.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

# Colours are far apart in RGB (pairwise distance > 100, also from the background) so that a tiny
# vision encoder, and the tests, can tell them apart from raw pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 235, 30),
    "purple": (140, 40, 190),
    "orange": (255, 128, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
LAYOUTS: tuple[str, ...] = ("single", "horizontal", "vertical")
# Position names of the two objects of each two-object layout, in the order of Scene.objects.
LAYOUT_POSITIONS: dict[str, tuple[str, str]] = {
    "horizontal": ("left", "right"),
    "vertical": ("top", "bottom"),
}
BACKGROUND_COLOUR: tuple[int, int, int] = (255, 255, 255)

# Object extent (diameter / side) as a fraction of the image side, before a +-1 pixel jitter.
# A large object is twice as wide as a small one (26 vs 13 pixels at 64x64).
_SIZE_FRACTIONS: dict[str, float] = {"small": 0.20, "large": 0.40}

Layout = Literal["single", "horizontal", "vertical"]


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene."""

    colour: str
    shape: str
    size: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")

    def phrase(self) -> str:
        """The object's noun phrase, e.g. ``"a small red circle"``."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects and how they are laid out (objects ordered left/right or top/bottom)."""

    objects: tuple[ShapeObject, ...]
    layout: Layout

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        expected_count = 1 if self.layout == "single" else 2
        if len(self.objects) != expected_count:
            raise ValueError(f"layout {self.layout!r} needs {expected_count} objects, got {len(self.objects)}")
        if not all(isinstance(item, ShapeObject) for item in self.objects):
            raise TypeError("Scene.objects must hold ShapeObject instances")

    @property
    def positions(self) -> tuple[str | None, ...]:
        """Position name of each object (``None`` for the object of a single scene)."""
        if self.layout == "single":
            return (None,)
        return LAYOUT_POSITIONS[self.layout]


def all_objects() -> list[ShapeObject]:
    """Every object of the world, in a fixed order."""
    return [
        ShapeObject(colour=colour, shape=shape, size=size)
        for size, colour, shape in itertools.product(SIZES, COLOURS, SHAPES)
    ]


def all_scenes() -> list[Scene]:
    """Every scene of the world, in a fixed order (36 single + 2 x 36 x 36 two-object scenes)."""
    objects = all_objects()
    scenes = [Scene(objects=(item,), layout="single") for item in objects]
    for layout in ("horizontal", "vertical"):
        scenes.extend(Scene(objects=pair, layout=layout) for pair in itertools.product(objects, repeat=2))
    return scenes


def random_object(rng: random.Random) -> ShapeObject:
    """A uniformly random object."""
    return ShapeObject(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), size=rng.choice(SIZES))


def random_scene(rng: random.Random, layout: Layout | None = None) -> Scene:
    """A random scene; the layout is uniform over LAYOUTS unless given, objects are uniform."""
    chosen_layout = layout if layout is not None else rng.choice(LAYOUTS)
    count = 1 if chosen_layout == "single" else 2
    return Scene(objects=tuple(random_object(rng) for _ in range(count)), layout=chosen_layout)


# ---------------------------------------------------------------------------------------------
# Captions


def caption(scene: Scene) -> str:
    """The grammar's caption of ``scene``, e.g. ``"a small red circle on the left and a large ..."``."""
    if scene.layout == "single":
        return scene.objects[0].phrase()
    first_position, second_position = LAYOUT_POSITIONS[scene.layout]
    first, second = scene.objects
    return f"{first.phrase()} on the {first_position} and {second.phrase()} on the {second_position}"


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(word) for word in words)


_OBJECT_PATTERN = (
    rf"a (?P<size{{index}}>{_alternation(SIZES)}) (?P<colour{{index}}>{_alternation(COLOURS)})"
    rf" (?P<shape{{index}}>{_alternation(SHAPES)})"
)
_POSITION_PATTERN = r"(?P<position{index}>left|right|top|bottom)"
_SINGLE_RE = re.compile("^" + _OBJECT_PATTERN.format(index=0) + "$")
_PAIR_RE = re.compile(
    "^"
    + _OBJECT_PATTERN.format(index=0)
    + " on the "
    + _POSITION_PATTERN.format(index=0)
    + " and "
    + _OBJECT_PATTERN.format(index=1)
    + " on the "
    + _POSITION_PATTERN.format(index=1)
    + "$"
)
_WHITESPACE_RE = re.compile(r"\s+")


def _normalise(text: str) -> str:
    text = _WHITESPACE_RE.sub(" ", text.strip().lower())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _object_from_match(match: re.Match[str], index: int) -> ShapeObject:
    return ShapeObject(
        colour=match.group(f"colour{index}"),
        shape=match.group(f"shape{index}"),
        size=match.group(f"size{index}"),
    )


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of the grammar describes, or ``None`` when ``text`` is not in the grammar."""
    if not isinstance(text, str):
        return None
    normalised = _normalise(text)
    single = _SINGLE_RE.match(normalised)
    if single is not None:
        return Scene(objects=(_object_from_match(single, 0),), layout="single")
    pair = _PAIR_RE.match(normalised)
    if pair is None:
        return None
    first_position, second_position = pair.group("position0"), pair.group("position1")
    first, second = _object_from_match(pair, 0), _object_from_match(pair, 1)
    for layout, positions in LAYOUT_POSITIONS.items():
        if (first_position, second_position) == positions:
            return Scene(objects=(first, second), layout=layout)
        if (second_position, first_position) == positions:
            return Scene(objects=(second, first), layout=layout)
    return None  # e.g. "on the left and ... on the top", or both on the left


# An object mentioned anywhere in free text, optionally followed by where it is.
_MENTION_RE = re.compile(
    rf"\b(?P<size>{_alternation(SIZES)}) (?P<colour>{_alternation(COLOURS)})"
    rf" (?P<shape>{_alternation(SHAPES)})\b"
    r"(?: (?:is |sits )?(?:on|at|in) the (?P<position>left|right|top|bottom)\b)?"
)


def scene_attributes_match(expected: Scene, text: str) -> bool:
    """Whether ``text`` names every object of ``expected`` with its size, colour, shape and position.

    The text may be any sentence ("The image shows a small red circle on the left and ..."); its
    object mentions ("<size> <colour> <shape>", each optionally followed by "on the <position>")
    must be exactly the scene's objects: each with its position in a two-object scene, without a
    position in a single scene, and nothing else.
    """
    normalised = _WHITESPACE_RE.sub(" ", re.sub(r"[^a-z]+", " ", text.lower()))
    mentions = Counter(
        (
            ShapeObject(colour=match.group("colour"), shape=match.group("shape"), size=match.group("size")),
            match.group("position"),
        )
        for match in _MENTION_RE.finditer(normalised)
    )
    wanted = Counter(zip(expected.objects, expected.positions, strict=True))
    return mentions == wanted


# ---------------------------------------------------------------------------------------------
# Drawing


def _regions(layout: str, image_size: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the area each object is drawn in; right/bottom exclusive."""
    half = image_size // 2
    if layout == "single":
        return [(0, 0, image_size, image_size)]
    if layout == "horizontal":
        return [(0, 0, half, image_size), (half, 0, image_size, image_size)]
    return [(0, 0, image_size, half), (0, half, image_size, image_size)]


def object_extent(size: str, image_size: int) -> int:
    """Nominal diameter / side in pixels of an object of ``size`` (drawn within +-1 pixel of it)."""
    return max(3, round(_SIZE_FRACTIONS[size] * image_size))


def _corner(low: int, high: int, centred: int, rng: random.Random | None) -> int:
    """A random coordinate in [low, high], or the centred one without an rng (or without room)."""
    return rng.randint(low, high) if rng is not None and high > low else centred


def _draw_object(
    draw: ImageDraw.ImageDraw,
    item: ShapeObject,
    region: tuple[int, int, int, int],
    layout: str,
    image_size: int,
    rng: random.Random | None,
) -> None:
    extent = object_extent(item.size, image_size)
    if rng is not None:
        extent += rng.randint(-1, 1)
    margin = max(1, image_size // 32)
    left, top, right, bottom = region
    # Range of the box's top-left corner that keeps the whole box inside the region with a margin.
    low_x, high_x = left + margin, right - margin - extent
    low_y, high_y = top + margin, bottom - margin - extent
    # Across the layout's axis, an object stays near the middle line (within image_size / 16), so
    # two objects never look diagonal: "left/right" and "top/bottom" are never ambiguous.
    cross_jitter = image_size // 16
    if layout == "horizontal":
        middle_y = (top + bottom - extent) // 2
        low_y, high_y = max(low_y, middle_y - cross_jitter), min(high_y, middle_y + cross_jitter)
    elif layout == "vertical":
        middle_x = (left + right - extent) // 2
        low_x, high_x = max(low_x, middle_x - cross_jitter), min(high_x, middle_x + cross_jitter)
    x0 = _corner(low_x, high_x, (left + right - extent) // 2, rng)
    y0 = _corner(low_y, high_y, (top + bottom - extent) // 2, rng)
    x1, y1 = x0 + extent - 1, y0 + extent - 1  # PIL boxes are inclusive
    fill = COLOURS[item.colour]
    if item.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif item.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # an upward-pointing isosceles triangle filling the box
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def draw_scene(scene: Scene, image_size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene`` on a plain background as an RGB image of ``image_size`` x ``image_size``.

    Without ``rng`` each object sits at the centre of its area with its nominal extent; with one,
    its position is jittered within its half (or the whole canvas for a single object; across the
    layout's axis only by image_size / 16) and its extent by +-1 pixel, so that images of the same
    scene differ.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_COLOUR)
    draw = ImageDraw.Draw(image)
    for item, region in zip(scene.objects, _regions(scene.layout, image_size), strict=True):
        _draw_object(draw, item, region, scene.layout, image_size, rng)
    return image
