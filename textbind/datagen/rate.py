"""Human rating of generated conversations in the browser (Gradio): images inline, ratings and tags to a CSV.

    bash scripts/rate_data.sh                        (INPUT=OUTPUT_DIR/filtered.jsonl, RATINGS=.../ratings.csv)
    textbind datagen rate --input filtered.jsonl --ratings ratings.csv

Input is the filter's filtered.jsonl (image K of `<imgK>caption</imgK>` is `images[K]["image"]`) or a
stage-2 JSON file (`<image>` markers with `image_list` under `image_dir`). Each rating is appended to
the CSV at once (`id,rating,tags,rated_at`; the last row of an id wins), so the page can be closed at
any time; on restart, rated conversations are skipped unless "show rated" is ticked.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from textbind import IMAGE_TOKEN
from textbind.datagen.filters import IMAGE_SPAN, split_utterances

logger = logging.getLogger(__name__)

RATINGS = ("Excellent", "Satisfactory", "Poor")  # best first
CSV_FIELDS = ("id", "rating", "tags", "rated_at")
ROLE_NAMES = {"user": "user", "assistant": "assistant", "Human": "user", "Assistant": "assistant"}


@dataclass
class Segment:
    text: str = ""
    image: str | None = None  # a path; text is then the image's caption


@dataclass
class ConversationView:
    """One conversation as the page shows it: turns of text and image segments."""

    id: str
    turns: list[tuple[str, list[Segment]]] = field(default_factory=list)  # (role, segments)

    @property
    def image_paths(self) -> list[str]:
        return [segment.image for _, segments in self.turns for segment in segments if segment.image]


def conversation_id(record: Any, index: int) -> str:
    """The id ratings refer to: the record's `id`, else its position in the file."""
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return str(record["id"])
    return str(index)


def _filtered_view(record: dict, identifier: str, folder: Path) -> ConversationView:
    images = record.get("images") or []
    turns = record.get("turns")
    if not isinstance(turns, list):  # a raw record: its transcript
        turns = [{"role": ROLE_NAMES[speaker], "content": text}
                 for speaker, text in split_utterances(str(record.get("response", "")))]
    view = ConversationView(identifier)
    for turn in turns:
        segments, text, last = [], str(turn.get("content", "")), 0
        for match in IMAGE_SPAN.finditer(text):
            segments.append(Segment(text[last:match.start()]))
            index = int(match.group(1))
            image = images[index] if index < len(images) and isinstance(images[index], dict) else {}
            path = image.get("image")
            resolved = None
            if isinstance(path, str) and path:
                # Relative paths start from the input's folder (or --image-dir), else the current directory.
                candidate = folder / path
                resolved = str((candidate if candidate.exists() else Path(path)).resolve())
            segments.append(Segment(str(image.get("caption", match.group(2))), resolved))
            last = match.end()
        segments.append(Segment(text[last:]))
        view.turns.append((ROLE_NAMES.get(str(turn.get("role")), "user"), segments))
    return view


def _stage2_view(record: dict, identifier: str, image_dir: str) -> ConversationView:
    view = ConversationView(identifier)
    folder = Path(record.get("image_dir") or image_dir)
    for turn in record.get("conversation") or []:
        if turn.get("role") not in ("user", "assistant"):
            continue
        pieces = str(turn.get("content", "")).split(IMAGE_TOKEN)
        image_list, caption_list = turn.get("image_list") or [], turn.get("caption_list") or []
        segments = [Segment(pieces[0])]
        for position, piece in enumerate(pieces[1:]):
            name = image_list[position] if position < len(image_list) else None
            caption = caption_list[position] if position < len(caption_list) else ""
            path = str((folder / name).resolve()) if isinstance(name, str) else None
            segments += [Segment(str(caption or ""), path), Segment(piece)]
        view.turns.append((turn["role"], segments))
    return view


def read_records(path: Path) -> list[dict]:
    """filtered.jsonl (one object a line; an unreadable line is None, with a warning) or a stage-2 JSON list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    logger.warning("%s line %d: not valid JSON (%s); skipped", path, number, error)
                    records.append(None)
        return records
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON list or a .jsonl file")
    return value


def load_conversations_for_rating(path: str | os.PathLike, image_dir: str = "") -> list[ConversationView]:
    """filtered.jsonl (or raw.jsonl) or a stage-2 JSON file -> the conversations to rate, in file order."""
    file = Path(path)
    views: list[ConversationView] = []
    seen: set[str] = set()
    records = read_records(file)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            continue
        identifier = conversation_id(record, index)
        if identifier in seen:
            logger.warning("%s: id %s occurs again (record %d); only the first is shown", file, identifier, index)
            continue
        seen.add(identifier)
        if "conversation" in record:
            views.append(_stage2_view(record, identifier, image_dir or str(file.parent)))
        else:
            views.append(_filtered_view(record, identifier, Path(image_dir) if image_dir else file.parent))
    return views


class RatingStore:
    """The ratings CSV: read once, appended to (flushed and fsynced) on every rating."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.ratings: dict[str, dict[str, str]] = read_ratings(self.path) if self.path.exists() else {}

    def add(self, identifier: str, rating: str, tags: str) -> dict[str, str]:
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, got {rating!r}")
        row = {"id": identifier, "rating": rating, "tags": " ".join(tags.split()),
               "rated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            file.flush()
            os.fsync(file.fileno())
        self.ratings[identifier] = row
        return row


def read_ratings(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """id -> its last row of the CSV (a later rating of the same conversation replaces an earlier one)."""
    ratings: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = {"id", "rating"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a ratings CSV (missing columns {sorted(missing)})")
        for number, row in enumerate(reader, start=2):
            if row.get("rating") not in RATINGS:
                logger.warning("%s line %d: unknown rating %r; ignored", path, number, row.get("rating"))
                continue
            ratings[str(row["id"])] = {key: row.get(key) or "" for key in CSV_FIELDS}
    return ratings


def chat_messages(view: ConversationView) -> list[dict[str, Any]]:
    """Gradio Chatbot messages: each text piece and each image (a file) of a turn in order."""
    messages: list[dict[str, Any]] = []
    for role, segments in view.turns:
        for segment in segments:
            if segment.image is not None:
                if os.path.isfile(segment.image):
                    messages.append({"role": role, "content": {"path": segment.image}})
                messages.append({"role": role, "content": f"*[image: {segment.text}]*"})
            elif segment.text.strip():
                messages.append({"role": role, "content": re.sub(r"[ \t]+", " ", segment.text.strip())})
    return messages


class RatingSession:
    """The page's logic, free of Gradio: which conversation comes next, and saving a rating."""

    def __init__(self, views: list[ConversationView], store: RatingStore):
        self.views, self.store = views, store
        self.index = {view.id: position for position, view in enumerate(views)}

    def status(self, identifier: str) -> str:
        rated = sum(1 for view in self.views if view.id in self.store.ratings)
        position = self.index.get(identifier)
        where = f"conversation {position + 1} of {len(self.views)} (id `{identifier}`)" if position is not None else ""
        current = self.store.ratings.get(identifier)
        mark = f"; rated **{current['rating']}**" if current else ""
        return f"{where}{mark} — {rated} of {len(self.views)} rated"

    def step(self, identifier: str | None, show_rated: bool, direction: int = 1) -> str:
        """The next (or previous) conversation after `identifier`, skipping rated ones unless `show_rated`."""
        if not self.views:
            return ""
        start = self.index.get(identifier or "", -1 if direction > 0 else 0)
        for offset in range(1, len(self.views) + 1):
            view = self.views[(start + direction * offset) % len(self.views)]
            if show_rated or view.id not in self.store.ratings:
                return view.id
        return identifier or self.views[0].id  # everything is rated: stay

    def first(self, show_rated: bool = False) -> str:
        return self.step(None, show_rated)

    def show(self, identifier: str) -> tuple[list[dict[str, Any]], str | None, str, str]:
        if identifier not in self.index:
            raise KeyError(f"no conversation with id {identifier!r}")
        current = self.store.ratings.get(identifier, {})
        return (chat_messages(self.views[self.index[identifier]]), current.get("rating") or None,
                current.get("tags", ""), self.status(identifier))


def build_app(session: RatingSession, title: str = "Rate generated conversations") -> Any:
    """The Blocks page; its named endpoints (`/show`, `/rate`, `/next`, `/previous`) serve gradio_client too."""
    import gradio as gr

    def show(identifier: str):
        try:
            messages, rating, tags, status = session.show(identifier)
        except KeyError as error:
            raise gr.Error(str(error.args[0])) from error
        return identifier, messages, rating, tags, status

    def rate(identifier: str, rating: str | None, tags: str, show_rated: bool):
        if identifier not in session.index:
            raise gr.Error(f"no conversation with id {identifier!r}")
        if rating not in RATINGS:
            raise gr.Error(f"choose a rating ({', '.join(RATINGS)}) first")
        session.store.add(identifier, rating, tags or "")
        return show(session.step(identifier, show_rated))

    def next_conversation(identifier: str, show_rated: bool):
        return show(session.step(identifier, show_rated, 1))

    def previous_conversation(identifier: str, show_rated: bool):
        return show(session.step(identifier, show_rated, -1))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nRate each conversation (images inline); tags are free text, e.g. "
                    "`wrong image, repetitive`. Ratings are saved at once.")
        status = gr.Markdown()
        identifier = gr.Textbox(label="Conversation id", interactive=False)
        chatbot = gr.Chatbot(label="Conversation", height=560)
        with gr.Row():
            rating = gr.Radio(list(RATINGS), label="Rating")
            tags = gr.Textbox(label="Tags", placeholder="free text")
        with gr.Row():
            previous_button = gr.Button("Previous")
            save_button = gr.Button("Save rating and next", variant="primary")
            next_button = gr.Button("Skip")
            show_rated = gr.Checkbox(label="Show rated conversations", value=False)
        outputs = [identifier, chatbot, rating, tags, status]
        save_button.click(rate, [identifier, rating, tags, show_rated], outputs, api_name="rate")
        next_button.click(next_conversation, [identifier, show_rated], outputs, api_name="next")
        previous_button.click(previous_conversation, [identifier, show_rated], outputs, api_name="previous")
        # Hidden trigger for /show: open any conversation by id.
        open_id = gr.Textbox(visible=False)
        open_id.submit(show, [open_id], outputs, api_name="show")
        demo.load(lambda: show(session.first()) if session.views else ("", [], None, "", "nothing to rate"),
                  None, outputs, api_visibility="private")
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textbind datagen rate",
        description="Rate generated conversations (filtered.jsonl or stage-2 JSON) in the browser; ratings "
                    "(Excellent / Satisfactory / Poor) and free-text tags go to a CSV.",
    )
    parser.add_argument("--input", required=True, help="filtered.jsonl or a stage-2 JSON file")
    parser.add_argument("--ratings", default=None, help="ratings CSV (default: ratings.csv beside the input)")
    parser.add_argument("--image-dir", default="",
                        help="folder that relative image paths start from (stage-2 records without image_dir, "
                             "filtered.jsonl's images); default: the input's folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7861)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    input_path = Path(arguments.input)
    if not input_path.is_file():
        print(f"error: {input_path}: no such file", file=sys.stderr)
        return 2
    try:
        views = load_conversations_for_rating(input_path, arguments.image_dir)
        store = RatingStore(arguments.ratings or input_path.parent / "ratings.csv")
    except (ValueError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session = RatingSession(views, store)
    logger.info("%d conversations, %d already rated; ratings go to %s", len(views), len(store.ratings), store.path)
    demo = build_app(session)
    folders = sorted({str(Path(path).parent) for view in views for path in view.image_paths})
    demo.queue().launch(server_name=arguments.host, server_port=arguments.port, allowed_paths=folders,
                        show_error=True, ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
