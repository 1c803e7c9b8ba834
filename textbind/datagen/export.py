"""Export of filtered conversations to stage-2 JSON (train/valid/test), with copied images and stats.json."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class ExportConfig:
    """How filtered conversations become the stage-2 training files."""

    valid_size: int = 100  # conversations in valid.json
    test_size: int = 100  # conversations in test.json (the rest go to train.json)
    seed: int = 0  # the split's shuffle seed
    copy_images: bool = True  # copy images into OUT/images under stable names
    resize: bool = False  # resize and pad images to image_size x image_size on white (as the original)
    image_size: int = 512  # side of the padded square when resize is on


def export_records(records: list[dict], out_dir: str | os.PathLike, config: ExportConfig | None = None) -> dict:
    """Write train.json, valid.json, test.json, images/ and stats.json; return the statistics."""
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    raise NotImplementedError
