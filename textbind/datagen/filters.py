"""Filters of raw LLM transcripts (raw.jsonl): the paper's rules in order, per-rule counts, kept and rejected records."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REFUSAL_PHRASES = [
    "i'm sorry", "i am sorry", "as an ai", "i cannot", "i can't", "i apologize", "i'm unable", "i am unable",
    "i'm not able", "i am not able", "language model",
]


@dataclass
class FilterConfig:
    """Filter rules (each switchable, run in this order) and their thresholds."""

    repeated_image_tag: bool = True  # reject: an <imgK> tag occurs twice
    image_index_out_of_range: bool = True  # reject: a tag index beyond the images given
    no_image: bool = True  # reject: no complete <imgK>caption</imgK> span at all
    duplicate_response: bool = True  # reject: a response identical to an earlier one
    no_human_turn: bool = True  # reject: no Human: utterance
    roles_not_alternating: bool = True  # reject: utterances mix roles or do not alternate starting with Human
    too_few_utterances: bool = True  # reject: fewer than min_utterances utterances
    unclosed_image_tag: bool = True  # clean (not reject): remove an opening <imgK> without its closing tag
    caption_mismatch: bool = True  # reject: a quoted caption farther than max_caption_distance from the original
    refusal: bool = True  # reject: an empty utterance or an assistant answer with a refusal phrase
    min_utterances: int = 3  # the too_few_utterances threshold
    max_caption_distance: float = 0.1  # Levenshtein distance / original caption length
    refusal_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PHRASES))  # lower-case


@dataclass
class FilterResult:
    kept: list[dict]
    rejected: list[dict]
    report: dict


def filter_records(records: list[dict], config: FilterConfig | None = None) -> FilterResult:
    """Run the rules over raw records; kept ones gain `turns`, rejected ones `rejected_by`."""
    raise NotImplementedError


def filter_file(input_path: str | os.PathLike, out_dir: str | os.PathLike,
                config: FilterConfig | None = None) -> FilterResult:
    """Filter raw.jsonl into out_dir/filtered.jsonl, rejected.jsonl and filter_report.json."""
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    raise NotImplementedError


_ = Any
