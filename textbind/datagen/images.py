"""Image preparation shared by the export and the image download: RGB on white, resized and padded to a square."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps


def pad_to_square(image: Image.Image, size: int = 512) -> Image.Image:
    """Fit `image` inside size x size (aspect kept) and centre it on white, as the original release's images are.

    Transparent pixels become white too (RGBA and palette images are composited first).
    """
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=(255, 255, 255))


def save_image_atomically(image: Image.Image, path: str | os.PathLike, format: str | None = None) -> None:
    """Save through a temporary file and a rename, so an interrupted run never leaves a truncated image."""
    target = Path(path)
    temporary = target.with_name(target.name + ".part")
    image.save(temporary, format=format or Image.registered_extensions().get(target.suffix.lower(), "PNG"))
    os.replace(temporary, target)
