"""Record formats read as stage-2 conversations: our own, LLaVA-Instruct, cc_sbu_align, Alpaca; JSON, JSONL,
parquet files and Hugging Face `datasets` ids.

`read_records` reads the records of a file or dataset id; `to_stage2_record` turns a record of any known
shape into the stage-2 format (`{"conversation": [...]}`), so training can mix sources as they come.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.data.conversation import DataError

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


def _read_json_records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one object a line: a `.jsonl` file, or a file whose first line is an object)."""
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if not (path.suffix == ".jsonl" or _is_json_object(text.split("\n", 1)[0])):
            raise DataError(f"{path}: not valid JSON ({error})") from error
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as line_error:
                    raise DataError(f"{path} line {number}: not valid JSON ({line_error})") from line_error
        return records
    if isinstance(value, dict) and isinstance(value.get("annotations"), list):
        return value["annotations"]  # cc_sbu_align's filter_cap.json
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSONL)")
    return value


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str | Path) -> list[Any]:
    """Records of a JSON list / JSONL / parquet file, or of a Hugging Face dataset id (`name` or `name:split`).

    Parquet files and dataset ids go through the `datasets` library (its usual cache and resolution;
    offline with HF_HUB_OFFLINE=1).
    """
    file = Path(path)
    if file.is_file() and file.suffix != ".parquet":
        return _read_json_records(file)
    try:
        import datasets
    except ImportError as error:
        what = "parquet files" if file.suffix == ".parquet" else f"dataset ids ({path} is not a file)"
        raise DataError(f"{path}: reading {what} needs the `datasets` library: pip install datasets") from error
    try:
        if file.suffix == ".parquet":
            if not file.is_file():
                raise DataError(f"{file}: no such file")
            dataset = datasets.Dataset.from_parquet(str(file))
        else:
            name, _, split = str(path).partition(":")
            dataset = datasets.load_dataset(name, split=split or "train")
    except DataError:
        raise
    except Exception as error:  # the library's errors have many types: name the source
        raise DataError(f"{path}: cannot read it as a parquet file or dataset id ({error})") from error
    return [dict(record) for record in dataset]


def to_stage2_record(record: Any, source: str) -> Any:
    """A record of any known shape in the stage-2 format; stage-2 records (and anything unknown) pass as they are
    (`parse_record` then names what is wrong)."""
    if not isinstance(record, dict) or "conversation" in record:
        return record
    if isinstance(record.get("conversations"), list):
        return convert_llava_record(record, source)
    if "instruction" in record and "output" in record:
        return convert_alpaca_record(record, source)
    return record
