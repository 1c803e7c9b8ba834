"""Filters of raw LLM transcripts (raw.jsonl): the paper's rules in order, per-rule counts, kept and rejected records.

A raw record is `{"id", "images": [{"key", "caption", "image", "url"?}], "response": transcript, ...}`; the
transcript is a sequence of utterances that start with `Human:` or `Assistant:` and refer to image K as
`<imgK>caption</imgK>`. A kept record is the raw record plus `turns` (`[{"role": "user"|"assistant",
"content"}]`, cleaned, image tags kept for the export); a rejected one is the raw record plus `rejected_by`
(the first rule that failed) and `reason`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

from textbind.config import ConfigError, load_config
from textbind.io import atomic_write_json, atomic_write_jsonl

logger = logging.getLogger(__name__)

DEFAULT_REFUSAL_PHRASES = [
    "i'm sorry", "i am sorry", "as an ai", "i cannot", "i can't", "i apologize", "i'm unable", "i am unable",
    "i'm not able", "i am not able", "as a language model", "as a text-based", "i do not have the ability",
]

# (rule, action, description) in the order the rules run; `clean` rules change the text and reject nothing.
RULES: list[tuple[str, str, str]] = [
    ("repeated_image_tag", "reject", "an <imgK> tag occurs more than once"),
    ("image_index_out_of_range", "reject", "a tag index K beyond the images given"),
    ("no_image", "reject", "no complete <imgK>caption</imgK> span"),
    ("duplicate_response", "reject", "the response is identical to an earlier one"),
    ("no_human_turn", "reject", "no Human: utterance"),
    ("roles_not_alternating", "reject", "an utterance mixes roles, or roles do not alternate starting with Human"),
    ("too_few_utterances", "reject", "fewer than min_utterances utterances"),
    ("unclosed_image_tag", "clean", "an <imgK> without its </imgK> (or the reverse) is removed from the turn"),
    ("caption_mismatch", "reject", "a quoted caption farther than max_caption_distance from the original"),
    ("refusal", "reject", "an empty utterance, or an answer with a refusal phrase"),
]
RULE_NAMES = [name for name, _, _ in RULES]
MALFORMED = "malformed"

OPEN_TAG = re.compile(r"<img(\d+)>")
ANY_TAG = re.compile(r"</?img(\d+)>")
IMAGE_SPAN = re.compile(r"<img(\d+)>(.*?)</img\1>", re.DOTALL)
# An utterance starts at the beginning of a line with its speaker's name.
UTTERANCE_START = re.compile(r"^[ \t]*(Human|Assistant)[ \t]*:", re.MULTILINE)
ROLE_MARKER = re.compile(r"\b(Human|Assistant)\s*:")
SPEAKER_ROLES = {"Human": "user", "Assistant": "assistant"}


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
    refusal_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PHRASES))  # case-insensitive
    trim_trailing_human: bool = True  # drop a last Human utterance, so conversations end with an answer

    def validate(self) -> FilterConfig:
        if self.min_utterances < 1:
            raise ConfigError(f"filter.min_utterances must be at least 1, got {self.min_utterances}")
        if self.max_caption_distance < 0:
            raise ConfigError(f"filter.max_caption_distance must be >= 0, got {self.max_caption_distance}")
        return self


@dataclass
class FilterResult:
    kept: list[dict]
    rejected: list[dict]
    report: dict


class RecordError(ValueError):
    """A raw record lacks a field the filters need; the message names the field."""


def check_raw_record(record: Any) -> None:
    """Raise RecordError if `record` is not a usable raw record (an object with `response` and `images`)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("response"), str):
        raise RecordError("field 'response' must be a string (the LLM's transcript)")
    images = record.get("images")
    if not isinstance(images, list):
        raise RecordError("field 'images' must be a list of {key, caption, image}")
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("caption"), str):
            raise RecordError(f"images[{index}] must be an object with a string 'caption'")


def split_utterances(response: str) -> list[tuple[str, str]]:
    """A transcript -> [(speaker, text)], speaker "Human" or "Assistant"; text before the first speaker is dropped."""
    starts = list(UTTERANCE_START.finditer(response))
    utterances = []
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(response)
        utterances.append((match.group(1), response[match.end():end].strip()))
    return utterances


def remove_unclosed_tags(text: str) -> tuple[str, int]:
    """Remove every image tag that is not part of a complete `<imgK>...</imgK>` span; returns (text, removed)."""
    kept_positions: set[int] = set()
    for match in IMAGE_SPAN.finditer(text):
        kept_positions.add(match.start())
        kept_positions.add(match.end() - len(f"</img{match.group(1)}>"))
    removed = 0
    pieces, last = [], 0
    for match in ANY_TAG.finditer(text):
        if match.start() in kept_positions:
            continue
        pieces.append(text[last:match.start()])
        last = match.end()
        removed += 1
    if not removed:
        return text, 0
    pieces.append(text[last:])
    # A removed tag can leave two spaces behind.
    return re.sub(r"[ \t]{2,}", " ", "".join(pieces)).strip(), removed


def caption_distance(quoted: str, original: str) -> float:
    """Levenshtein distance between the two captions over the original caption's length (stripped)."""
    quoted, original = quoted.strip(), original.strip()
    return Levenshtein.distance(quoted, original) / max(len(original), 1)


def _normalise(text: str) -> str:
    return text.lower().replace("\u2019", "'")


class _Rejection(Exception):
    def __init__(self, rule: str, reason: str):
        super().__init__(reason)
        self.rule, self.reason = rule, reason


class RecordFilter:
    """Applies the rules to one record after another, keeping the state (earlier responses) and the counts."""

    def __init__(self, config: FilterConfig | None = None):
        self.config = (config or FilterConfig()).validate()
        self.seen_responses: set[str] = set()
        self.counts = {name: 0 for name in RULE_NAMES}
        self.total = self.kept = self.malformed = 0
        self.tags_removed = self.trailing_human_removed = 0
        self.malformed_messages: list[str] = []

    def enabled(self, rule: str) -> bool:
        return bool(getattr(self.config, rule))

    def add_malformed(self, source: str, message: str, text: str | None = None, record: Any = None) -> dict:
        """Count a line or record that is not a raw record; returns the entry for rejected.jsonl."""
        self.total += 1
        self.malformed += 1
        full = f"{source}: {message}"
        self.malformed_messages.append(full)
        logger.warning("skipped malformed input: %s", full)
        entry: dict[str, Any] = {"source": source, "rejected_by": MALFORMED, "reason": message}
        if record is not None:
            entry["record"] = record
        if text is not None:
            entry["text"] = text
        return entry

    def process(self, record: Any, source: str) -> tuple[bool, dict]:
        """(kept, record): kept records gain `turns`; rejected ones `rejected_by` and `reason`."""
        try:
            check_raw_record(record)
        except RecordError as error:
            return False, self.add_malformed(source, str(error), record=record)
        self.total += 1
        try:
            turns = self._apply_rules(record)
        except _Rejection as rejection:
            self.counts[rejection.rule] += 1
            return False, {**record, "rejected_by": rejection.rule, "reason": rejection.reason}
        self.kept += 1
        return True, {**record, "turns": turns}

    def _apply_rules(self, record: dict) -> list[dict]:
        config = self.config
        response, images = record["response"], record["images"]
        opened = [int(index) for index in OPEN_TAG.findall(response)]
        if self.enabled("repeated_image_tag"):
            repeated = sorted({index for index in opened if opened.count(index) > 1})
            if repeated:
                raise _Rejection("repeated_image_tag",
                                 f"tag <img{repeated[0]}> occurs {opened.count(repeated[0])} times")
        if self.enabled("image_index_out_of_range"):
            beyond = sorted({int(index) for index in ANY_TAG.findall(response) if int(index) >= len(images)})
            if beyond:
                raise _Rejection("image_index_out_of_range",
                                 f"tag <img{beyond[0]}> but the record has {len(images)} image(s)")
        if self.enabled("no_image") and not IMAGE_SPAN.search(response):
            raise _Rejection("no_image", "no <imgK>caption</imgK> span in the response")
        # Every record's response counts as "earlier" for the later ones, whatever happens to it afterwards.
        response_key = response.strip()
        duplicate = response_key in self.seen_responses
        self.seen_responses.add(response_key)
        if self.enabled("duplicate_response") and duplicate:
            raise _Rejection("duplicate_response", "the response is identical to an earlier record's")

        utterances = split_utterances(response)
        if self.enabled("no_human_turn") and not any(speaker == "Human" for speaker, _ in utterances):
            raise _Rejection("no_human_turn", "no utterance starts with 'Human:'")
        if self.enabled("roles_not_alternating"):
            for index, (speaker, text) in enumerate(utterances):
                expected = "Human" if index % 2 == 0 else "Assistant"
                if speaker != expected:
                    raise _Rejection("roles_not_alternating",
                                     f"utterance {index} is by {speaker}, expected {expected}")
                marker = ROLE_MARKER.search(text)
                if marker:
                    raise _Rejection("roles_not_alternating",
                                     f"utterance {index} ({speaker}) contains '{marker.group(0)}'")
        if self.enabled("too_few_utterances") and len(utterances) < config.min_utterances:
            raise _Rejection("too_few_utterances",
                             f"{len(utterances)} utterance(s), at least {config.min_utterances} needed")

        texts = [text for _, text in utterances]
        removed_here = 0
        if self.enabled("unclosed_image_tag"):
            cleaned = [remove_unclosed_tags(text) for text in texts]
            texts = [text for text, _ in cleaned]
            removed_here = sum(removed for _, removed in cleaned)
        if self.enabled("caption_mismatch"):
            for index, text in enumerate(texts):
                for match in IMAGE_SPAN.finditer(text):
                    image_index = int(match.group(1))
                    if image_index >= len(images):
                        continue  # only reachable with image_index_out_of_range switched off
                    original = images[image_index]["caption"]
                    distance = caption_distance(match.group(2), original)
                    if distance > config.max_caption_distance:
                        raise _Rejection(
                            "caption_mismatch",
                            f"utterance {index}: <img{image_index}> quotes {match.group(2).strip()!r}, "
                            f"{distance:.3f} from the original {original.strip()!r}",
                        )
        if self.enabled("refusal"):
            phrases = [_normalise(phrase) for phrase in config.refusal_phrases if phrase.strip()]
            for index, ((speaker, _), text) in enumerate(zip(utterances, texts)):
                if not text.strip():
                    raise _Rejection("refusal", f"utterance {index} ({speaker}) is empty")
                if speaker == "Assistant":
                    lowered = _normalise(text)
                    found = next((phrase for phrase in phrases if phrase in lowered), None)
                    if found:
                        raise _Rejection("refusal", f"utterance {index} refuses ({found!r})")

        # The cleaning counts only records that are kept, so the report adds up.
        if removed_here:
            self.counts["unclosed_image_tag"] += 1
            self.tags_removed += removed_here
        turns = [{"role": SPEAKER_ROLES[speaker], "content": text} for (speaker, _), text in zip(utterances, texts)]
        if config.trim_trailing_human and len(turns) > 1 and turns[-1]["role"] == "user":
            # Training needs a conversation that ends with an answer; a last question has none.
            turns.pop()
            self.trailing_human_removed += 1
        return turns

    def report(self) -> dict:
        rules = [
            {"rule": name, "action": action, "enabled": self.enabled(name), "count": self.counts[name],
             "description": description}
            for name, action, description in RULES
        ]
        return {
            "input": self.total,
            "kept": self.kept,
            "rejected": self.total - self.kept,
            "malformed": self.malformed,
            "rules": rules,
            "counts": dict(self.counts),
            "cleaned": {"unclosed_image_tags_removed": self.tags_removed,
                        "trailing_human_removed": self.trailing_human_removed},
            "malformed_messages": self.malformed_messages[:100],
            "config": {key: value for key, value in vars(self.config).items()},
        }


def filter_records(records: Iterable[Any], config: FilterConfig | None = None) -> FilterResult:
    """Run the rules over raw records; kept ones gain `turns`, rejected ones `rejected_by` and `reason`."""
    record_filter = RecordFilter(config)
    kept, rejected = [], []
    for index, record in enumerate(records):
        is_kept, result = record_filter.process(record, f"record {index}")
        (kept if is_kept else rejected).append(result)
    return FilterResult(kept, rejected, record_filter.report())


def read_raw_lines(path: Path, record_filter: RecordFilter) -> Iterable[tuple[Any, str, dict | None]]:
    """(record, source, malformed entry): unreadable JSON lines come back as malformed entries, never raise."""
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            source = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"not valid JSON ({error})"
                yield None, source, record_filter.add_malformed(source, message, text=line.rstrip("\n"))
                continue
            yield record, source, None


def filter_file(input_path: str | os.PathLike, out_dir: str | os.PathLike,
                config: FilterConfig | None = None) -> FilterResult:
    """Filter raw.jsonl into out_dir/filtered.jsonl, rejected.jsonl and filter_report.json."""
    path = Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such raw transcript file")
    record_filter = RecordFilter(config)
    kept, rejected = [], []
    for record, source, malformed in read_raw_lines(path, record_filter):
        if malformed is not None:
            rejected.append(malformed)
            continue
        is_kept, result = record_filter.process(record, source)
        (kept if is_kept else rejected).append(result)
    report = {"input_path": str(path), **record_filter.report()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "filtered.jsonl", kept)
    atomic_write_jsonl(out / "rejected.jsonl", rejected)
    atomic_write_json(out / "filter_report.json", report)
    return FilterResult(kept, rejected, report)


def format_report(report: dict) -> str:
    """The per-rule counts as a text table, in the order the rules ran."""
    width = max(len(name) for name in RULE_NAMES + [MALFORMED]) + 2
    lines = [f"{'rule':<{width}}{'action':<8}{'count':>8}", "-" * (width + 16)]
    if report.get("malformed"):
        lines.append(f"{MALFORMED:<{width}}{'reject':<8}{report['malformed']:>8}")
    for row in report["rules"]:
        count = row["count"] if row["enabled"] else "off"
        lines.append(f"{row['rule']:<{width}}{row['action']:<8}{count:>8}")
    lines.append("-" * (width + 16))
    lines.append(f"{'input':<{width}}{'':<8}{report['input']:>8}")
    lines.append(f"{'kept':<{width}}{'':<8}{report['kept']:>8}")
    lines.append(f"{'rejected':<{width}}{'':<8}{report['rejected']:>8}")
    cleaned = report.get("cleaned", {})
    if cleaned:
        lines.append(f"(unclosed image tags removed: {cleaned.get('unclosed_image_tags_removed', 0)}; "
                     f"trailing Human utterances dropped: {cleaned.get('trailing_human_removed', 0)})")
    return "\n".join(lines)


@dataclass
class _FilterOnly:
    """The filter section alone, so `filter.key=value` overrides resolve as in the full data-engine config."""

    filter: FilterConfig = field(default_factory=FilterConfig)

    def validate(self) -> _FilterOnly:
        self.filter.validate()
        return self


def config_from_overrides(overrides: list[str]) -> FilterConfig:
    """`filter.key=value` (or bare `key=value`) overrides -> FilterConfig."""
    qualified = [item if item.startswith("filter.") else f"filter.{item}" for item in overrides]
    return load_config(None, qualified, config_type=_FilterOnly).filter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textbind datagen filter",
        description="Filter raw LLM transcripts (raw.jsonl) into filtered.jsonl, rejected.jsonl and "
                    "filter_report.json. Extra arguments are overrides of the filter section, e.g. "
                    "filter.max_caption_distance=0.2 filter.refusal=false.",
    )
    parser.add_argument("--input", required=True, help="raw.jsonl: one raw record per line")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("overrides", nargs="*", help="filter.key=value (or key=value)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = config_from_overrides(arguments.overrides)
        result = filter_file(arguments.input, arguments.out, config)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result.report))
    print(f"wrote {Path(arguments.out) / 'filtered.jsonl'} ({len(result.kept)} kept), rejected.jsonl, "
          "filter_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
