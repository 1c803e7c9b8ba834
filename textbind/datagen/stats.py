"""Statistics of stage-2 conversations (stats.json): sizes, image placement and the paper's diversity measure."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping

from textbind import END_TOKEN, IMAGE_TOKEN, START_TOKEN
from textbind.diversity import ngram_diversity, turn_diversity


def _plain_text(content: str) -> str:
    """A turn's words without image markers, for n-gram counting (a marker is not language)."""
    for token in (IMAGE_TOKEN, START_TOKEN, END_TOKEN):
        content = content.replace(token, " ")
    return re.sub(r"\s+", " ", content).strip()


def _summary(values: list[int]) -> dict:
    counts = Counter(values)
    return {
        "mean": sum(values) / len(values) if values else 0.0,
        "min": min(values) if values else 0,
        "max": max(values) if values else 0,
        "distribution": {str(value): counts[value] for value in sorted(counts)},
    }


def conversation_stats(records: Iterable[Mapping]) -> dict:
    """Statistics of stage-2 records (`{"conversation": [{"role", "content", "image_list", ...}]}`).

    Utterances are the user and assistant turns (a system turn is not one). Diversity follows the paper:
    for each turn index, the sum over n = 2, 3, 4 of distinct / total n-grams of the texts at that index,
    averaged over the indices; "user" and "assistant" index each role's turns on their own.
    """
    utterances, images = [], []
    images_by_role = {"user": 0, "assistant": 0}
    all_texts, user_texts, assistant_texts = [], [], []
    for record in records:
        turns = [turn for turn in record["conversation"] if turn.get("role") in ("user", "assistant")]
        utterances.append(len(turns))
        images.append(sum(len(turn.get("image_list") or []) for turn in turns))
        for turn in turns:
            images_by_role[turn["role"]] += len(turn.get("image_list") or [])
        texts = [_plain_text(turn["content"]) for turn in turns]
        all_texts.append(texts)
        user_texts.append([text for turn, text in zip(turns, texts) if turn["role"] == "user"])
        assistant_texts.append([text for turn, text in zip(turns, texts) if turn["role"] == "assistant"])
    by_index: dict[int, list[str]] = {}
    for texts in all_texts:
        for index, text in enumerate(texts):
            by_index.setdefault(index, []).append(text)
    return {
        "conversations": len(utterances),
        "utterances_per_conversation": _summary(utterances),
        "images_per_conversation": _summary(images),
        "images": sum(images),
        "images_in_user_turns": images_by_role["user"],
        "images_in_assistant_turns": images_by_role["assistant"],
        "diversity": {
            "all": turn_diversity(all_texts),
            "user": turn_diversity(user_texts),
            "assistant": turn_diversity(assistant_texts),
            "per_turn_index": [
                {"turn": index, "role": "user" if index % 2 == 0 else "assistant", "conversations": len(texts),
                 "diversity": ngram_diversity(texts)}
                for index, texts in sorted(by_index.items())
            ],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m textbind.datagen.stats",
                                     description="Print the statistics of stage-2 JSON files (together).")
    parser.add_argument("paths", nargs="+", help="stage-2 JSON files")
    arguments = parser.parse_args(argv)
    records = []
    for path in arguments.paths:
        with open(path, encoding="utf-8") as file:
            records += json.load(file)
    print(json.dumps(conversation_stats(records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
