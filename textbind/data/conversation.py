"""Conversations in the stage-2 JSON format: parsing and validation with errors that name the record."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from textbind import IMAGE_TOKEN

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A record, field or file of the training or inference data is not usable; the message says where."""


def split_at_images(content: str) -> list[str]:
    """A turn's text around its `<image>` markers: n markers give n + 1 pieces (the pieces may be empty)."""
    return content.split(IMAGE_TOKEN)


@dataclass
class Turn:
    role: str
    content: str
    image_list: list[Any] = field(default_factory=list)  # file names (under image_dir) or PIL images
    caption_list: list[str] = field(default_factory=list)

    @property
    def num_markers(self) -> int:
        return self.content.count(IMAGE_TOKEN)


@dataclass
class Conversation:
    turns: list[Turn]
    image_dir: str = ""
    source: str = "conversation"  # where it came from, for error messages: "train.json record 17"

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == "system" else None

    @property
    def dialogue(self) -> list[Turn]:
        return self.turns[1:] if self.system is not None else self.turns

    def image_path(self, image: Any) -> Any:
        if isinstance(image, str) and self.image_dir and not os.path.isabs(image):
            return os.path.join(self.image_dir, image)
        return image


def parse_record(record: Any, source: str, default_image_dir: str = "") -> Conversation:
    """One JSON record -> Conversation; structural problems raise DataError naming `source` and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with a 'conversation' list, got {type(record).__name__}")
    raw_turns = record.get("conversation")
    if not isinstance(raw_turns, list):
        raise DataError(f"{source}: field 'conversation' must be a list of turns")
    turns = []
    for index, raw in enumerate(raw_turns):
        where = f"{source} turn {index}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content'")
        role, content = raw.get("role"), raw.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field 'role' must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'content' must be a string")
        image_list = raw.get("image_list") or []
        caption_list = raw.get("caption_list") or []
        if not isinstance(image_list, list) or not isinstance(caption_list, list):
            raise DataError(f"{where}: fields 'image_list' and 'caption_list' must be lists")
        turns.append(Turn(role, content, list(image_list), [str(c) if c is not None else "" for c in caption_list]))
    image_dir = record.get("image_dir") or default_image_dir
    return Conversation(turns=turns, image_dir=str(image_dir), source=source)


def validate_conversation(
    conversation: Conversation, *, for_inference: bool = False, check_files: bool = True
) -> None:
    """Raise DataError on the first problem: roles, markers vs images, captions of assistant images, files."""
    source = conversation.source
    if not conversation.turns:
        raise DataError(f"{source}: the conversation is empty")
    dialogue = conversation.dialogue
    if any(turn.role == "system" for turn in dialogue):
        raise DataError(f"{source}: a system turn may only come first")
    if not dialogue:
        raise DataError(f"{source}: the conversation holds no user turn")
    offset = len(conversation.turns) - len(dialogue)
    for index, turn in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise DataError(
                f"{source} turn {index + offset}: role {turn.role!r} out of order, expected {expected!r} "
                "(roles alternate user/assistant after an optional system turn)"
            )
    final = "user" if for_inference else "assistant"
    if dialogue[-1].role != final:
        purpose = "inference" if for_inference else "training"
        raise DataError(f"{source}: the conversation must end with a {final} turn for {purpose}")
    for index, turn in enumerate(conversation.turns):
        where = f"{source} turn {index}"
        if turn.num_markers != len(turn.image_list):
            raise DataError(
                f"{where}: content has {turn.num_markers} {IMAGE_TOKEN} marker(s) but image_list has "
                f"{len(turn.image_list)} image(s)"
            )
        if turn.role == "system" and turn.image_list:
            raise DataError(f"{where}: a system turn cannot hold images")
        if turn.role == "assistant" and not for_inference:  # history images need no caption
            if len(turn.caption_list) < len(turn.image_list) or any(
                not caption.strip() for caption in turn.caption_list[: len(turn.image_list)]
            ):
                raise DataError(
                    f"{where}: assistant image(s) need a caption each in caption_list "
                    f"(the model learns to write it); got {turn.caption_list!r}"
                )
        if check_files:
            for image in turn.image_list:
                path = conversation.image_path(image)
                if isinstance(path, str) and not os.path.isfile(path):
                    raise DataError(f"{where}: image file {path} not found")


def load_image(path_or_image: Any, source: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises DataError naming it and `source`."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    try:
        with Image.open(path_or_image) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{source}: image {path_or_image} is unreadable ({error})") from error


@dataclass
class LoadResult:
    conversations: list[Conversation]
    errors: list[str]  # one message per skipped record


def load_conversations(
    path: str | os.PathLike,
    *,
    image_dir: str = "",
    on_bad_record: str = "skip",
    check_files: bool = True,
    check_images: bool = False,
) -> LoadResult:
    """Read and validate stage-2 records; bad records are skipped and reported, or raise if "error".

    `path` is a JSON list or JSONL file, a parquet file or a Hugging Face dataset id (`name[:split]`);
    records may also be LLaVA-Instruct or Alpaca-style, converted on the fly (`textbind.data.formats`).
    """
    from textbind.data.formats import read_records, to_stage2_record

    file = Path(path)
    if not file.is_file() and (file.suffix in (".json", ".jsonl", ".parquet") or str(path).startswith((".", "/"))):
        raise DataError(f"{file}: no such file")
    records = read_records(path)
    conversations, errors = [], []
    for index, record in enumerate(records):
        try:
            source = f"{file} record {index}"
            conversation = parse_record(to_stage2_record(record, source), source, image_dir)
            validate_conversation(conversation, check_files=check_files)
            if check_images:
                for turn in conversation.turns:
                    for image in turn.image_list:
                        load_image(conversation.image_path(image), conversation.source)
        except DataError as error:
            if on_bad_record == "error":
                raise
            errors.append(str(error))
            continue
        conversations.append(conversation)
    if errors:
        logger.warning("%s: skipped %d of %d records; first: %s", file, len(errors), len(records), errors[0])
    return LoadResult(conversations, errors)
