"""Converters of the original stage-2 mixture's other sources (LLaVA-Instruct, cc_sbu_align, Alpaca) to stage 2.

    textbind datagen convert --format llava --input llava_instruct_150k.json --out llava.json --image-dir coco/train2017
    textbind datagen convert --format cc_sbu_align --input cc_sbu_align/ --out minigpt4.json
    textbind datagen convert --format alpaca --input open_platypus.json --out platypus.json

The outputs load with `textbind.data.conversation.load_conversations`; list them in `data.train_path` (comma
separated) with `data.train_weights` to train on the mixture.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.data.conversation import DataError, parse_record, validate_conversation
from textbind.datagen.filters import write_json

logger = logging.getLogger(__name__)

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# MiniGPT-4's second-stage instructions for cc_sbu_align (one is picked per image, stably).
DESCRIBE_PROMPTS = [
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
]


def _no_control_tokens(text: str, keep_image: bool = False) -> str:
    """Source text must not carry the model's own control strings (they would be read as structure)."""
    for token in (START_TOKEN, END_TOKEN) + (() if keep_image else (IMAGE_TOKEN,)):
        text = text.replace(token, "")
    return text


def convert_llava_record(record: Any, source: str) -> dict:
    """LLaVA-Instruct: `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}` -> stage 2.

    The one image goes to the turn whose text holds `<image>` (LLaVA puts it in the first human turn,
    before or after the question); an image without a marker is placed at the start of the first user turn.
    """
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{source}: expected an object with a 'conversations' list")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{source}: field 'image' must be a file name (one image per record)")
    turns = []
    for index, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{source} conversations[{index}]: expected {{'from', 'value'}}")
        role = LLAVA_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DataError(f"{source} conversations[{index}]: unknown speaker {turn.get('from')!r}")
        turns.append({"role": role, "content": _no_control_tokens(turn["value"], keep_image=True).strip(),
                      "image_list": [], "caption_list": []})
    markers = sum(turn["content"].count(IMAGE_TOKEN) for turn in turns)
    if image:
        if markers > 1:
            raise DataError(f"{source}: {markers} {IMAGE_TOKEN} markers for one image")
        if markers == 0:
            first_user = next((turn for turn in turns if turn["role"] == "user"), None)
            if first_user is None:
                raise DataError(f"{source}: no human turn to hold the image")
            first_user["content"] = f"{IMAGE_TOKEN}\n{first_user['content']}"
        holder = next(turn for turn in turns if IMAGE_TOKEN in turn["content"])
        holder["image_list"] = [image]
        holder["caption_list"] = []  # LLaVA gives no caption; only assistant images need one
    elif markers:
        for turn in turns:  # a text-only record with a stray marker: the marker is text, not an image
            turn["content"] = turn["content"].replace(IMAGE_TOKEN, "").strip()
    converted = {"id": str(record.get("id", "")), "conversation": turns}
    return converted


def convert_cc_sbu_align_record(record: Any, source: str, seed: int = 0) -> dict:
    """cc_sbu_align: `{"image_id", "caption"}` -> a one-turn "describe this image" conversation.

    The instruction is picked from DESCRIBE_PROMPTS by a hash of (seed, image id), so reruns agree.
    """
    if not isinstance(record, dict) or "image_id" not in record or not isinstance(record.get("caption"), str):
        raise DataError(f"{source}: expected an object with 'image_id' and a string 'caption'")
    image_id = str(record["image_id"])
    caption = _no_control_tokens(record["caption"]).strip()
    if not caption:
        raise DataError(f"{source}: empty caption for image {image_id}")
    digest = int(hashlib.sha1(f"{seed}:{image_id}".encode()).hexdigest(), 16)
    prompt = DESCRIBE_PROMPTS[digest % len(DESCRIBE_PROMPTS)]
    return {"id": image_id, "conversation": [
        {"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}", "image_list": [f"{image_id}.jpg"],
         "caption_list": [caption]},
        {"role": "assistant", "content": caption, "image_list": [], "caption_list": []},
    ]}


def convert_alpaca_record(record: Any, source: str) -> dict:
    """Alpaca / Open-Platypus: `{"instruction", "input"?, "output"}` -> a text-only one-turn conversation."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with 'instruction' and 'output'")
    instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        raise DataError(f"{source}: fields 'instruction', 'output' (and 'input') must be strings")
    instruction, extra, output = (_no_control_tokens(text).strip() for text in (instruction, extra, output))
    if not instruction or not output:
        raise DataError(f"{source}: empty instruction or output")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return {"conversation": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _read_records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one object a line)."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number}: not valid JSON ({error})") from error
        return records
    if isinstance(value, dict) and isinstance(value.get("annotations"), list):
        return value["annotations"]  # cc_sbu_align's filter_cap.json
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSONL)")
    return value


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
    write_json(out, records)
    print(f"wrote {len(records)} conversations to {out}; skipped {len(errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
