"""Converters of the original stage-2 mixture's other sources (LLaVA-Instruct, cc_sbu_align, Alpaca) to stage 2.

    textbind datagen convert --format llava --input llava_instruct_150k.json --out llava.json --image-dir coco/train2017
    textbind datagen convert --format cc_sbu_align --input cc_sbu_align/ --out minigpt4.json
    textbind datagen convert --format alpaca --input open_platypus.json --out platypus.json

The outputs load with `textbind.data.conversation.load_conversations`; list them in `data.train_path` (comma
separated) with `data.train_weights` to train on the mixture.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textbind.data.conversation import DataError, parse_record, validate_conversation
from textbind.data.formats import (  # noqa: F401  (DESCRIBE_PROMPTS: part of this module's interface)
    DESCRIBE_PROMPTS,
    convert_alpaca_record,
    convert_cc_sbu_align_record,
    convert_llava_record,
)
from textbind.data.formats import read_records as _read_records
from textbind.io import atomic_write_json

logger = logging.getLogger(__name__)

def convert(
    kind: str, input_path: str | Path, image_dir: str | None = None, *, seed: int = 0, check_files: bool = False
) -> tuple[list[dict], list[str]]:
    """Convert a source file (or the cc_sbu_align folder) -> (stage-2 records, messages for skipped records)."""
    path = Path(input_path)
    if kind == "cc_sbu_align" and path.is_dir():
        if image_dir is None:
            image_dir = str(path / "image")
        path = path / "filter_cap.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    converters: dict[str, Callable[[Any, str], dict]] = {
        "llava": convert_llava_record,
        "cc_sbu_align": lambda record, source: convert_cc_sbu_align_record(record, source, seed),
        "alpaca": convert_alpaca_record,
    }
    if kind not in converters:
        raise DataError(f"unknown format {kind!r}; expected one of {sorted(converters)}")
    records, errors = [], []
    for index, record in enumerate(_read_records(path)):
        source = f"{path} record {index}"
        try:
            converted = converters[kind](record, source)
            if image_dir and any(turn.get("image_list") for turn in converted["conversation"]):
                converted["image_dir"] = image_dir
            validate_conversation(parse_record(converted, source), check_files=check_files)
        except DataError as error:
            errors.append(str(error))
            continue
        records.append(converted)
    return records, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textbind datagen convert",
        description="Convert LLaVA-Instruct JSON, MiniGPT-4's cc_sbu_align or Alpaca-style records (Open-Platypus) "
                    "to the stage-2 JSON format.",
    )
    parser.add_argument("--format", required=True, choices=("llava", "cc_sbu_align", "alpaca"))
    parser.add_argument("--input", required=True,
                        help="the source JSON/JSONL file (cc_sbu_align: its folder or filter_cap.json)")
    parser.add_argument("--out", required=True, help="the stage-2 JSON file to write")
    parser.add_argument("--image-dir", default=None,
                        help="folder of the source's images, written as each record's image_dir "
                             "(cc_sbu_align default: INPUT/image)")
    parser.add_argument("--seed", type=int, default=0, help="picks cc_sbu_align's describe instructions")
    parser.add_argument("--check-files", action="store_true", help="skip records whose image file is missing")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        records, errors = convert(arguments.format, arguments.input, arguments.image_dir, seed=arguments.seed,
                                  check_files=arguments.check_files)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for message in errors[:20]:
        logger.warning("skipped %s", message)
    out = Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, records)
    print(f"wrote {len(records)} conversations to {out}; skipped {len(errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
