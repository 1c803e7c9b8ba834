"""Tests of the toy renderer: the shapes-world image decoder behind the ImageDecoder protocol."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from textbind.image_decoder import ImageDecoder
from textbind.toy.renderer import UNPARSEABLE_COLOUR, ToyRenderer
from textbind.toy.world import BACKGROUND_COLOUR, COLOURS, draw_scene, parse_caption

PAIR_CAPTION = "a small red circle on the left and a large blue square on the right"


def dominant_colour(pixels: np.ndarray) -> str:
    """Name of the palette colour most non-background pixels of ``pixels`` (h, w, 3) are closest to."""
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=int)  # (C, 3)
    foreground = pixels[np.any(pixels != np.array(BACKGROUND_COLOUR), axis=-1)].astype(int)  # (N, 3)
    assert len(foreground) > 0
    nearest = np.abs(foreground[:, None, :] - palette[None]).sum(-1).argmin(1)  # (N,)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def test_implements_the_image_decoder_protocol() -> None:
    assert isinstance(ToyRenderer(), ImageDecoder)


@pytest.mark.parametrize("seed", [None, 0, 1, 12345])
def test_draws_the_caption(seed: int | None) -> None:
    image = ToyRenderer()(PAIR_CAPTION, seed=seed)
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image)
    assert dominant_colour(pixels[:, :32]) == "red"
    assert dominant_colour(pixels[:, 32:]) == "blue"
    left_area = np.any(pixels[:, :32] != np.array(BACKGROUND_COLOUR), axis=-1).sum()
    right_area = np.any(pixels[:, 32:] != np.array(BACKGROUND_COLOUR), axis=-1).sum()
    assert right_area > 3 * left_area  # large square vs small circle


def test_vertical_caption_and_size() -> None:
    renderer = ToyRenderer(image_size=96)
    pixels = np.asarray(renderer("a large yellow triangle on the top and a small purple circle on the bottom", seed=3))
    assert pixels.shape == (96, 96, 3)
    assert dominant_colour(pixels[:48]) == "yellow"
    assert dominant_colour(pixels[48:]) == "purple"


def test_deterministic_for_a_seed() -> None:
    renderer = ToyRenderer()
    assert renderer(PAIR_CAPTION, seed=5).tobytes() == renderer(PAIR_CAPTION, seed=5).tobytes()
    assert renderer(PAIR_CAPTION).tobytes() == renderer(PAIR_CAPTION).tobytes()
    # without a seed the scene is drawn centred, exactly as draw_scene without jitter
    assert renderer(PAIR_CAPTION).tobytes() == draw_scene(parse_caption(PAIR_CAPTION)).tobytes()
    assert len({renderer(PAIR_CAPTION, seed=seed).tobytes() for seed in range(8)}) > 1


def test_accepts_the_caption_in_any_case_and_spacing() -> None:
    renderer = ToyRenderer()
    messy = "  A Small Red Circle on the left and a large BLUE square on the right.  "
    assert renderer(messy, seed=2).tobytes() == renderer(PAIR_CAPTION, seed=2).tobytes()


@pytest.mark.parametrize(
    "caption",
    ["", "a photo of a dog", "a small pink circle", "<start>", "a small red circle on the left", "\x00" * 5],
)
def test_text_outside_the_grammar_gives_a_grey_canvas_and_a_warning(
    caption: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="textbind.toy.renderer"):
        image = ToyRenderer(image_size=48)(caption, seed=0)
    assert image.mode == "RGB" and image.size == (48, 48)
    assert np.all(np.asarray(image) == np.array(UNPARSEABLE_COLOUR))
    assert any("outside the toy grammar" in record.getMessage() for record in caplog.records)


def test_non_string_caption_does_not_crash() -> None:
    image = ToyRenderer()(None, seed=0)  # type: ignore[arg-type]
    assert np.all(np.asarray(image) == np.array(UNPARSEABLE_COLOUR))
