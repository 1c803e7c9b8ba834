"""Tests of the toy shapes world: vocabulary floor, caption grammar, attribute matching and drawing."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from textbind.toy.world import (
    BACKGROUND_COLOUR,
    COLOURS,
    LAYOUTS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    all_scenes,
    caption,
    draw_scene,
    parse_caption,
    random_scene,
    scene_attributes_match,
)

RED_CIRCLE = ShapeObject(colour="red", shape="circle", size="small")
BLUE_SQUARE = ShapeObject(colour="blue", shape="square", size="large")


def test_world_floor() -> None:
    assert len(COLOURS) >= 6
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert set(SIZES) == {"small", "large"}
    assert set(LAYOUTS) == {"single", "horizontal", "vertical"}
    palette = [np.array(rgb, dtype=float) for rgb in [*COLOURS.values(), BACKGROUND_COLOUR]]
    for first, second in itertools.combinations(palette, 2):
        assert np.linalg.norm(first - second) > 100


def test_scene_validation() -> None:
    with pytest.raises(ValueError):
        ShapeObject(colour="pink", shape="circle", size="small")
    with pytest.raises(ValueError):
        Scene(objects=(RED_CIRCLE,), layout="horizontal")
    with pytest.raises(ValueError):
        Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="single")
    with pytest.raises(ValueError):
        Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="diagonal")  # type: ignore[arg-type]


def test_caption_examples() -> None:
    assert caption(Scene(objects=(RED_CIRCLE,), layout="single")) == "a small red circle"
    assert (
        caption(Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="horizontal"))
        == "a small red circle on the left and a large blue square on the right"
    )
    assert (
        caption(Scene(objects=(BLUE_SQUARE, RED_CIRCLE), layout="vertical"))
        == "a large blue square on the top and a small red circle on the bottom"
    )


def test_round_trip_over_the_whole_scene_space() -> None:
    scenes = all_scenes()
    object_count = len(COLOURS) * len(SHAPES) * len(SIZES)
    assert len(scenes) == object_count + 2 * object_count**2
    assert len(set(scenes)) == len(scenes)
    captions = [caption(scene) for scene in scenes]
    assert len(set(captions)) == len(captions)
    for scene, text in zip(scenes, captions, strict=True):
        assert parse_caption(text) == scene
        assert scene_attributes_match(scene, text)


def test_parse_is_robust_to_case_whitespace_and_order() -> None:
    expected = Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="horizontal")
    assert parse_caption("  A small RED circle on the left and a large blue Square on the right \n") == expected
    assert parse_caption("a small red circle   on the left and\ta large blue square on the right.") == expected
    assert parse_caption("a large blue square on the right and a small red circle on the left") == expected
    assert parse_caption("a small red circle on the bottom and a large blue square on the top") == Scene(
        objects=(BLUE_SQUARE, RED_CIRCLE), layout="vertical"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "a small pink circle",
        "a medium red circle",
        "a small red hexagon",
        "small red circle",
        "an small red circle",
        "a red small circle",
        "two small red circles",
        "a small red circle on the left",
        "a small red circle and a large blue square",
        "a small red circle on the left and a large blue square on the left",
        "a small red circle on the left and a large blue square on the top",
        "a small red circle on the top and a large blue square on the top",
        "a small red circle on the left and a large blue square on the right and a small red circle",
        "a small red circle on the left, a large blue square on the right",
        "draw a small red circle",
        "a small red circle.. ",
        "<start> a small red circle <end>",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text: str) -> None:
    assert parse_caption(text) is None


def test_parse_rejects_non_strings() -> None:
    assert parse_caption(None) is None  # type: ignore[arg-type]


def test_scene_attributes_match() -> None:
    pair = Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="horizontal")
    single = Scene(objects=(RED_CIRCLE,), layout="single")
    assert scene_attributes_match(
        pair, "The image shows a small red circle on the left and a large blue square on the right."
    )
    assert scene_attributes_match(pair, "A large blue square is on the right, and a small red circle sits on the left!")
    assert not scene_attributes_match(pair, "a small red circle on the right and a large blue square on the left")
    assert not scene_attributes_match(pair, "a small red circle on the left and a large blue square on the bottom")
    assert not scene_attributes_match(pair, "a small red circle on the left and a small blue square on the right")
    assert not scene_attributes_match(pair, "a small red circle on the left")
    assert not scene_attributes_match(pair, "a small red circle and a large blue square")
    assert scene_attributes_match(single, "I see a small red circle.")
    assert scene_attributes_match(single, "It is a SMALL red circle")
    assert not scene_attributes_match(single, "a large red circle")
    assert not scene_attributes_match(single, "a small green circle")
    assert not scene_attributes_match(single, "a small red square")
    assert not scene_attributes_match(single, "a small red circle and a large blue square")
    assert not scene_attributes_match(single, "a small red circle on the left")
    assert not scene_attributes_match(single, "")


def test_random_scene_is_seeded_and_covers_the_world() -> None:
    first = [random_scene(random.Random(7)) for _ in range(3)]
    assert first == [random_scene(random.Random(7)) for _ in range(3)]
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(3000)]
    assert {scene.layout for scene in scenes} == set(LAYOUTS)
    objects = [item for scene in scenes for item in scene.objects]
    assert {item.colour for item in objects} == set(COLOURS)
    assert {item.shape for item in objects} == set(SHAPES)
    assert {item.size for item in objects} == set(SIZES)
    assert random_scene(rng, layout="vertical").layout == "vertical"


# ---------------------------------------------------------------------------------------------
# Drawing: measure each object's pixels in its half of the canvas


def _regions(layout: str, image_size: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of the area each object of ``layout`` must stay in."""
    half = image_size // 2
    whole = slice(0, image_size)
    if layout == "single":
        return [(whole, whole)]
    if layout == "horizontal":
        return [(whole, slice(0, half)), (whole, slice(half, image_size))]
    return [(slice(0, half), whole), (slice(half, image_size), whole)]


def measure_objects(pixels: np.ndarray, layout: str) -> list[dict[str, object]]:
    """Colour name, bounding-box side and fill ratio of the object in each region of ``pixels``."""
    palette_names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in palette_names], dtype=int)  # (C, 3)
    measured = []
    for rows, columns in _regions(layout, pixels.shape[0]):
        area = pixels[rows, columns].astype(int)  # (h, w, 3)
        foreground = np.any(area != np.array(BACKGROUND_COLOUR), axis=-1)  # (h, w)
        distances = np.abs(area[foreground][:, None, :] - palette[None]).sum(-1)  # (N, C)
        nearest = np.bincount(distances.argmin(1), minlength=len(palette_names))
        ys, xs = np.nonzero(foreground)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        measured.append(
            {
                "colour": palette_names[int(nearest.argmax())],
                "pure": int(distances.min(1).max()) == 0,
                "side": max(height, width),
                "square_box": abs(int(height) - int(width)) <= 1,
                "fill": foreground.sum() / (height * width),
            }
        )
    return measured


def shape_from_fill(fill: float) -> str:
    """Square fills its bounding box, a circle about pi/4 of it, a triangle about half."""
    if fill > 0.93:
        return "square"
    if fill > 0.68:
        return "circle"
    return "triangle"


def test_draw_scene_matches_every_scene() -> None:
    rng = random.Random(0)
    for scene in all_scenes():
        image = draw_scene(scene, image_size=64, rng=rng)
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image)
        # Each half holds exactly its object: named colour, unblended pixels, size and shape.
        for item, measured in zip(scene.objects, measure_objects(pixels, scene.layout), strict=True):
            assert measured["colour"] == item.colour, caption(scene)
            assert measured["pure"], caption(scene)
            assert measured["square_box"], caption(scene)
            side = measured["side"]
            assert (side <= 15) if item.size == "small" else (side >= 24), (caption(scene), side)
            assert shape_from_fill(float(measured["fill"])) == item.shape, (caption(scene), measured["fill"])


def test_objects_stay_inside_their_half_with_a_margin() -> None:
    rng = random.Random(1)
    for _ in range(300):
        scene = random_scene(rng, layout=rng.choice(["horizontal", "vertical"]))
        pixels = np.asarray(draw_scene(scene, rng=rng))
        for rows, columns in _regions(scene.layout, 64):
            area = np.any(pixels[rows, columns] != np.array(BACKGROUND_COLOUR), axis=-1)
            assert area.any()
            assert not (area[0].any() or area[-1].any() or area[:, 0].any() or area[:, -1].any())


def test_draw_scene_without_rng_is_centred_and_deterministic() -> None:
    scene = Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="vertical")
    first, second = draw_scene(scene), draw_scene(scene)
    assert first.tobytes() == second.tobytes()
    jittered = {draw_scene(scene, rng=random.Random(seed)).tobytes() for seed in range(10)}
    assert len(jittered) > 1


@pytest.mark.parametrize("image_size", [32, 128])
def test_draw_scene_other_sizes(image_size: int) -> None:
    scene = Scene(objects=(RED_CIRCLE, BLUE_SQUARE), layout="horizontal")
    image = draw_scene(scene, image_size=image_size, rng=random.Random(0))
    assert image.size == (image_size, image_size)
    measured = measure_objects(np.asarray(image), "horizontal")
    assert [item["colour"] for item in measured] == ["red", "blue"]
    assert measured[1]["side"] > 1.6 * measured[0]["side"]
