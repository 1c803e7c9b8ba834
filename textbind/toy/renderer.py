"""The toy image decoder: draws a caption of the shapes-world grammar (the toy stand-in for SDXL)."""

from __future__ import annotations

import logging
import random

from PIL import Image

from textbind.toy.world import draw_scene, parse_caption

logger = logging.getLogger(__name__)

# What the renderer returns for a caption outside the grammar: a plain mid-grey canvas, which no
# caption of the grammar can produce (the shapes world has a white background).
UNPARSEABLE_COLOUR: tuple[int, int, int] = (128, 128, 128)


class ToyRenderer:
    """Renders captions of the shapes-world grammar; implements ``textbind.image_decoder.ImageDecoder``.

    With a seed, objects are jittered by a ``random.Random(seed)`` stream, so one (caption, seed)
    pair always gives the same image; without one, every object sits at the centre of its area.
    A caption outside the grammar gives a plain grey canvas and a logged warning, never an error,
    because the captions come from a language model that may write anything.
    """

    def __init__(self, image_size: int = 64) -> None:
        self.image_size = image_size

    def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image:
        scene = parse_caption(caption) if isinstance(caption, str) else None
        if scene is None:
            logger.warning("caption is outside the toy grammar, drawing a grey canvas: %r", caption)
            return Image.new("RGB", (self.image_size, self.image_size), UNPARSEABLE_COLOUR)
        rng = random.Random(seed) if seed is not None else None
        return draw_scene(scene, image_size=self.image_size, rng=rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"
