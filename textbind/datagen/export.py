"""Export of filtered conversations to stage-2 JSON (train/valid/test), with copied images and stats.json.

Each `<imgK>caption</imgK>` of a kept record's `turns` becomes one `<image>` marker; the turn's `image_list`
names image K's file, `caption_list` holds image K's ORIGINAL caption (not the LLM's quotation) and
`url_list` its URL when the raw record has URLs. Records that still fail `validate_conversation` (possible
when filter rules were switched off) or whose image files are missing are skipped and reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.config import ConfigError, load_config
from textbind.data.conversation import DataError, parse_record, validate_conversation
from textbind.datagen.filters import IMAGE_SPAN
from textbind.datagen.images import pad_to_square, save_image_atomically
from textbind.datagen.stats import conversation_stats
from textbind.io import atomic_write_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class ExportConfig:
    """How filtered conversations become the stage-2 training files."""

    valid_size: int = 100  # conversations in valid.json
    test_size: int = 100  # conversations in test.json (the rest go to train.json)
    seed: int = 0  # the split's shuffle seed
    copy_images: bool = True  # copy images into OUT/images under stable names (else records name the sources)
    resize: bool = False  # resize and pad images to image_size x image_size on white (as the original)
    image_size: int = 512  # side of the padded square when resize is on
    write_image_dir: bool = True  # records carry "image_dir": the absolute images folder (else pass IMAGE_DIR)

    def validate(self) -> ExportConfig:
        if self.valid_size < 0 or self.test_size < 0:
            raise ConfigError("export.valid_size and export.test_size must be >= 0")
        if self.image_size < 8:
            raise ConfigError(f"export.image_size must be at least 8, got {self.image_size}")
        return self


class ImageStore:
    """Gives every source image one stable file name under `images_dir` and puts the file there once."""

    def __init__(self, images_dir: Path, config: ExportConfig):
        self.images_dir, self.config = images_dir, config
        self.names: dict[str, str] = {}  # resolved source path -> exported name
        self.taken: set[str] = set()
        self.copied = self.reused = 0

    def _stable_name(self, source: Path, key: str) -> str:
        suffix = ".png" if self.config.resize else (source.suffix.lower() or ".png")
        digest = hashlib.sha1(str(source).encode()).hexdigest()
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", key).strip("._") if key else digest[:16]
        name = f"{stem}{suffix}"
        if name in self.taken:  # another source with the same key: disambiguate by the path's hash
            name = f"{stem}-{digest[:8]}{suffix}"
        return name

    def add(self, source: Path, key: str) -> str:
        resolved = str(source.resolve())
        if resolved in self.names:
            return self.names[resolved]
        name = self._stable_name(source.resolve(), key)
        target = self.images_dir / name
        if target.exists():  # an earlier run put it there (names are stable): resumable
            self.reused += 1
        elif self.config.resize:
            try:
                with Image.open(source) as image:
                    padded = pad_to_square(image, self.config.image_size)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise DataError(f"image {source} is unreadable ({error})") from error
            save_image_atomically(padded, target, "PNG")
            self.copied += 1
        else:
            temporary = target.with_name(target.name + ".part")
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
            self.copied += 1
        self.names[resolved] = name
        self.taken.add(name)
        return name


def _resolve_image(path: str, image_root: Path | None) -> Path:
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    if image_root is not None and (image_root / candidate).exists():
        return image_root / candidate
    return candidate


def _strip_special_tokens(text: str) -> str:
    """The LLM's own `<image>`/`<start>`/`<end>` strings would break the marker count and the caption branches."""
    for token in (IMAGE_TOKEN, START_TOKEN, END_TOKEN):
        text = text.replace(token, "")
    return text


def to_stage2(record: dict, store: ImageStore | None, image_root: Path | None,
              exported_names: dict[str, str] | None = None) -> dict:
    """One filtered record -> one stage-2 record; DataError names the record and the problem.

    `exported_names` caches raw image path -> exported name across records (images are shared widely).
    """
    exported_names = {} if exported_names is None else exported_names
    source = f"record {record.get('id', '?')}"
    turns, images = record.get("turns"), record.get("images") or []
    if not isinstance(turns, list):
        raise DataError(f"{source}: no 'turns' (export takes the filter's output, filtered.jsonl)")
    has_urls = any(isinstance(image, dict) and image.get("url") for image in images)
    conversation = []
    for turn_index, turn in enumerate(turns):
        text = _strip_special_tokens(str(turn.get("content", "")))
        pieces: list[str] = []
        image_list: list[str] = []
        caption_list: list[str] = []
        url_list: list[str] = []
        last = 0
        for match in IMAGE_SPAN.finditer(text):
            index = int(match.group(1))
            if index >= len(images):
                raise DataError(f"{source} turn {turn_index}: <img{index}> but the record has {len(images)} image(s)")
            image = images[index]
            path = image.get("image")
            if not isinstance(path, str) or not path:
                raise DataError(f"{source}: images[{index}] has no 'image' path")
            name = exported_names.get(path)
            if name is None:
                resolved = _resolve_image(path, image_root)
                if not resolved.is_file():
                    raise DataError(f"{source}: images[{index}] file {resolved} not found")
                name = store.add(resolved, str(image.get("key") or "")) if store else str(resolved.resolve())
                exported_names[path] = name
            image_list.append(name)
            caption_list.append(str(image.get("caption", "")).strip())
            url_list.append(str(image.get("url") or ""))
            pieces += [text[last:match.start()], IMAGE_TOKEN]
            last = match.end()
        content = "".join(pieces + [text[last:]]).strip()
        entry: dict[str, Any] = {"role": turn.get("role"), "content": content,
                                 "image_list": image_list, "caption_list": caption_list}
        if has_urls:
            entry["url_list"] = url_list
        conversation.append(entry)
    result: dict[str, Any] = {"id": record.get("id"), "conversation": conversation}
    if store is not None and store.config.write_image_dir:
        result["image_dir"] = str(store.images_dir.resolve())
    return result


def split_records(records: list[dict], config: ExportConfig) -> dict[str, list[dict]]:
    """Shuffle with the seed; valid_size to valid, test_size to test, the rest to train.

    With fewer records than valid_size + test_size + 1, valid and test take a quarter each, so train
    is never empty.
    """
    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    valid_size, test_size = config.valid_size, config.test_size
    if valid_size + test_size >= len(records):
        valid_size, test_size = min(valid_size, len(records) // 4), min(test_size, len(records) // 4)
        logger.warning("only %d conversations: valid and test take %d and %d", len(records), valid_size, test_size)
    shuffled = [records[index] for index in order]
    return {
        "valid": shuffled[:valid_size],
        "test": shuffled[valid_size:valid_size + test_size],
        "train": shuffled[valid_size + test_size:],
    }


def export_records(records: list[dict], out_dir: str | os.PathLike, config: ExportConfig | None = None,
                   *, image_root: str | os.PathLike | None = None) -> dict:
    """Write train.json, valid.json, test.json, images/ and stats.json under out_dir; return the statistics.

    `image_root` resolves relative `image` paths of the records (tried first, then the current directory).
    """
    config = (config or ExportConfig()).validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = None
    if config.copy_images:
        (out / "images").mkdir(exist_ok=True)
        store = ImageStore(out / "images", config)
    root = Path(image_root) if image_root is not None else None
    exported, errors = [], []
    exported_names: dict[str, str] = {}
    for index, record in enumerate(records):
        try:
            stage2 = to_stage2(record, store, root, exported_names)
            validate_conversation(parse_record(stage2, f"record {record.get('id', index)}"), check_files=False)
        except DataError as error:
            errors.append(str(error))
            logger.warning("export skipped %s", error)
            continue
        exported.append(stage2)
    splits = split_records(exported, config)
    for name in SPLITS:
        atomic_write_json(out / f"{name}.json", splits[name], indent=None)
    stats = {
        **conversation_stats(exported),
        "splits": {name: len(splits[name]) for name in SPLITS},
        "input_records": len(records),
        "skipped": len(errors),
        "skipped_messages": errors[:100],
        "images_copied": store.copied if store else 0,
        "images_reused": store.reused if store else 0,
        "config": vars(config),
    }
    atomic_write_json(out / "stats.json", stats)
    return stats


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a JSONL file; unreadable lines come back as messages naming the line, never raise."""
    records, errors = [], []
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                errors.append(f"{path} line {number}: not valid JSON ({error})")
                continue
            if not isinstance(record, dict):
                errors.append(f"{path} line {number}: expected a JSON object")
                continue
            records.append(record)
    return records, errors


@dataclass
class _ExportOnly:
    """The export section alone, so `export.key=value` overrides resolve as in the full data-engine config."""

    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> _ExportOnly:
        self.export.validate()
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textbind datagen export",
        description="Write filtered conversations (filtered.jsonl) as stage-2 train.json, valid.json, test.json, "
                    "images/ and stats.json. Extra arguments override the export section, e.g. "
                    "export.valid_size=50 export.resize=true.",
    )
    parser.add_argument("--input", required=True, help="filtered.jsonl (the output of `textbind datagen filter`)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image-root", default=None,
                        help="folder that relative image paths start from (default: the input file's folder)")
    parser.add_argument("overrides", nargs="*", help="export.key=value (or key=value)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    path = Path(arguments.input)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    try:
        qualified = [item if item.startswith("export.") else f"export.{item}" for item in arguments.overrides]
        config = load_config(None, qualified, config_type=_ExportOnly).export
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    records, errors = read_jsonl(path)
    for message in errors:
        logger.warning("skipped %s", message)
    stats = export_records(records, arguments.out, config, image_root=arguments.image_root or path.parent)
    splits = stats["splits"]
    print(f"exported {stats['conversations']} conversations to {arguments.out}: train {splits['train']}, "
          f"valid {splits['valid']}, test {splits['test']}; skipped {stats['skipped'] + len(errors)}")
    print(f"utterances/conversation {stats['utterances_per_conversation']['mean']:.2f}, images/conversation "
          f"{stats['images_per_conversation']['mean']:.2f} (user {stats['images_in_user_turns']}, assistant "
          f"{stats['images_in_assistant_turns']}), diversity {stats['diversity']['all']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
