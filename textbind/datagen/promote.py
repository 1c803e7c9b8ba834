"""Promotion of the best-rated conversations into the seed-example pool that prompts the next round.

    textbind datagen promote --ratings ratings.csv --input filtered.jsonl --pool pool.jsonl [--min-rating Excellent]

The pool is JSONL of `{"id", "images": [{"caption"}], "response"}`: the transcript with image K written
`<imgK>caption</imgK>`, as the prompt shows examples. A promoted example's transcript is rebuilt from the
cleaned turns with each image's ORIGINAL caption, so the examples teach exact quoting. If POOL does not
exist yet it starts as a copy of the shipped default pool (textbind/datagen/data/seed_examples.jsonl).
Conversations already in the pool (same id or same transcript) are not added twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from textbind import IMAGE_TOKEN
from textbind.datagen.filters import IMAGE_SPAN, split_utterances
from textbind.datagen.rate import RATINGS, conversation_id, read_ratings, read_records

logger = logging.getLogger(__name__)

DEFAULT_POOL = Path(__file__).resolve().parent / "data" / "seed_examples.jsonl"
SPEAKERS = {"user": "Human", "assistant": "Assistant"}


class PromoteError(ValueError):
    """A record cannot become a seed example; the message names it."""


def _from_filtered(record: dict, identifier: str) -> dict:
    images = record.get("images") or []
    captions = [str(image.get("caption", "")).strip() if isinstance(image, dict) else "" for image in images]
    turns = record.get("turns")
    if not isinstance(turns, list):
        turns = [{"role": "user" if speaker == "Human" else "assistant", "content": text}
                 for speaker, text in split_utterances(str(record.get("response", "")))]
    lines = []
    for turn in turns:
        def original(match: Any) -> str:
            index = int(match.group(1))
            if index >= len(captions):
                raise PromoteError(f"record {identifier}: <img{index}> but {len(captions)} image(s)")
            return f"<img{index}>{captions[index]}</img{index}>"

        lines.append(f"{SPEAKERS[turn['role']]}: {IMAGE_SPAN.sub(original, str(turn['content']))}")
    return {"id": identifier, "images": [{"caption": caption} for caption in captions], "response": "\n".join(lines)}


def _from_stage2(record: dict, identifier: str) -> dict:
    captions: list[str] = []
    lines = []
    for turn in record.get("conversation") or []:
        if turn.get("role") not in SPEAKERS:
            continue
        pieces = str(turn.get("content", "")).split(IMAGE_TOKEN)
        caption_list = turn.get("caption_list") or []
        text = pieces[0]
        for position, piece in enumerate(pieces[1:]):
            caption = str(caption_list[position]).strip() if position < len(caption_list) else ""
            if not caption:
                raise PromoteError(f"record {identifier}: an image without a caption cannot be written as a tag")
            index = len(captions)
            captions.append(caption)
            text += f"<img{index}>{caption}</img{index}>{piece}"
        lines.append(f"{SPEAKERS[turn['role']]}: {text.strip()}")
    return {"id": identifier, "images": [{"caption": caption} for caption in captions], "response": "\n".join(lines)}


def seed_example(record: dict, identifier: str) -> dict:
    """A filtered (or stage-2) record -> a pool entry `{"id", "images": [{"caption"}], "response"}`."""
    if "conversation" in record:
        return _from_stage2(record, identifier)
    return _from_filtered(record, identifier)


def read_pool(path: Path) -> list[dict]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error})") from error
    return entries


def promote(ratings_path: str | os.PathLike, input_path: str | os.PathLike, pool_path: str | os.PathLike,
            min_rating: str = "Excellent", default_pool: Path | None = DEFAULT_POOL) -> dict:
    """Append the conversations rated `min_rating` or better to the pool; return counts and the distribution."""
    if min_rating not in RATINGS:
        raise ValueError(f"--min-rating must be one of {RATINGS}, got {min_rating!r}")
    accepted = set(RATINGS[: RATINGS.index(min_rating) + 1])
    ratings = read_ratings(ratings_path)
    records = read_records(Path(input_path))
    by_id = {conversation_id(record, index): record for index, record in enumerate(records) if isinstance(record, dict)}
    pool = Path(pool_path)
    if pool.exists():
        entries, started_from = read_pool(pool), ""
    elif default_pool is not None and default_pool.is_file():
        entries = read_pool(default_pool)
        started_from = str(default_pool)
    else:
        entries, started_from = [], ""
    known_ids = {str(entry.get("id")) for entry in entries}
    known_responses = {str(entry.get("response", "")).strip() for entry in entries}
    distribution = Counter(row["rating"] for identifier, row in ratings.items() if identifier in by_id)
    added, duplicates, problems = [], 0, []
    for identifier, row in ratings.items():
        if row["rating"] not in accepted:
            continue
        if identifier not in by_id:
            problems.append(f"rated id {identifier} is not in {input_path}")
            continue
        try:
            example = seed_example(by_id[identifier], identifier)
        except PromoteError as error:
            problems.append(str(error))
            continue
        if identifier in known_ids or example["response"].strip() in known_responses:
            duplicates += 1
            continue
        known_ids.add(identifier)
        known_responses.add(example["response"].strip())
        added.append(example)
    pool.parent.mkdir(parents=True, exist_ok=True)
    temporary = pool.with_name(pool.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as file:
        for entry in entries + added:
            file.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(temporary, pool)
    return {
        "distribution": {rating: distribution.get(rating, 0) for rating in RATINGS},
        "unrated": len(by_id) - sum(distribution.values()),
        "added": len(added),
        "duplicates": duplicates,
        "pool_size": len(entries) + len(added),
        "started_from": started_from,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textbind datagen promote",
        description="Add the best-rated conversations to the seed-example pool (JSONL) for the next round; "
                    "prints the rating distribution.",
    )
    parser.add_argument("--ratings", required=True, help="the ratings CSV of `textbind datagen rate`")
    parser.add_argument("--input", required=True, help="the rated conversations: filtered.jsonl or stage-2 JSON")
    parser.add_argument("--pool", required=True,
                        help="seed-example pool to extend (created from the shipped default pool if missing)")
    parser.add_argument("--min-rating", default="Excellent", choices=RATINGS)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in (arguments.ratings, arguments.input):
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    try:
        summary = promote(arguments.ratings, arguments.input, arguments.pool, arguments.min_rating)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in summary["problems"]:
        logger.warning("%s", problem)
    total = sum(summary["distribution"].values())
    print("rating distribution:")
    for rating, count in summary["distribution"].items():
        share = f"{100 * count / total:.1f}%" if total else "-"
        print(f"  {rating:<13}{count:>6}  {share:>6}")
    print(f"  {'unrated':<13}{summary['unrated']:>6}")
    source = f" (started from {summary['started_from']})" if summary["started_from"] else ""
    print(f"added {summary['added']} conversation(s) rated {arguments.min_rating} or better to {arguments.pool}"
          f"{source}; {summary['duplicates']} already there; pool size {summary['pool_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
