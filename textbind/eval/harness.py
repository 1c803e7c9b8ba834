"""Resumable benchmark runs: answer every item once, append it to predictions.jsonl, score, write report.json.

Layout of one run (`OUTPUT_DIR/<benchmark>/`):
    run.json            what the predictions were made with (benchmark settings, model, generation);
                        a restart with other settings is refused instead of mixing two models' answers
    predictions.jsonl   one line per item, appended and flushed as each item finishes: the generated
                        turn (content, captions, image files), the reference, or the error that made
                        the item fail; a restarted run skips the items already there
    images/             the generated images, `<item id>_<k>.png`
    report.json         every metric with the number of items behind it (and a 95% interval where given)

An item whose input is unusable (missing image, malformed line) is recorded with its error and
counts as failed (wrong) in the scores; it never stops the run. Anything else (a model error, an
interrupt) stops the run with every finished item already on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from textbind.data.conversation import Conversation, DataError
from textbind.generation import DecodingConfig
from textbind.io import atomic_write_json

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.json"
RUN_FILE = "run.json"


@dataclass
class EvalItem:
    """One question of a benchmark: how to build its conversation, and what its scorer compares against."""

    item_id: str
    # Builds the conversation to answer (it ends with a user turn); raises DataError when the input is
    # unusable. Built lazily so that a large benchmark (base64 images) is not decoded all at once.
    make_conversation: Callable[[], Conversation] | None
    reference: dict[str, Any] = field(default_factory=dict)  # JSON-able; stored with the prediction
    error: str | None = None  # the item could not even be described (e.g. a malformed line)


@dataclass
class Metric:
    value: float
    count: int  # items (or pairs, images, questions: see the benchmark) behind the value
    ci95: tuple[float, float] | None = None  # seeded bootstrap interval, for headline metrics

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"value": self.value, "count": self.count}
        if self.ci95 is not None:
            result["ci95"] = [self.ci95[0], self.ci95[1]]
        return result


@dataclass
class Scores:
    """A benchmark's scoring of its predictions."""

    metrics: dict[str, Metric]
    item_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # item id -> metric -> value
    details: dict[str, Any] = field(default_factory=dict)  # tables (per subtask, per category, ...)
    ranking_metric: str = ""  # the item score the report sorts worst and best items by


class Benchmark(Protocol):
    """What the harness needs of a benchmark."""

    name: str

    def settings(self) -> dict[str, Any]:
        """JSON-able description of the data and options (recorded in run.json, compared on restart)."""

    def items(self) -> list[EvalItem]:
        """Every item, in a stable order."""

    def generation_config(self, config: DecodingConfig) -> DecodingConfig:
        """The generation settings for this benchmark, given the run's (e.g. no images for multiple choice)."""

    def score(self, records: list[dict[str, Any]], output_dir: Path) -> Scores:
        """Score the prediction records (one per item, in item order); may write official files to output_dir."""


def safe_name(item_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", item_id)


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a predictions file by item id. A torn last line (the run was killed while writing
    it) is cut off the file; a bad line elsewhere is an error naming it."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    offset = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not a record with an 'id'")
            except ValueError as error:
                if is_last:
                    logger.warning("%s line %d is incomplete (interrupted write): dropped", path, number)
                    with open(path, "r+b") as file:
                        file.truncate(offset)
                    break
                raise DataError(f"{path} line {number}: not a prediction record ({error})") from error
            records[str(record["id"])] = record
        offset += len(line) + 1
    else:
        if raw and not raw.endswith(b"\n"):  # the last record is whole but its newline was not written
            with open(path, "ab") as file:
                file.write(b"\n")
    return records


def _check_run_settings(directory: Path, settings: dict[str, Any], restart: bool) -> None:
    run_file = directory / RUN_FILE
    predictions = directory / PREDICTIONS_FILE
    if restart and directory.exists():
        predictions.unlink(missing_ok=True)
        shutil.rmtree(directory / "images", ignore_errors=True)
    if predictions.exists() and run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
            raise DataError(
                f"{predictions} was made with other settings ({', '.join(changed)} differ); "
                "use another output directory, or --restart to discard those predictions"
            )
    atomic_write_json(run_file, settings)


def answer_item(generator: Any, item: EvalItem, config: DecodingConfig, directory: Path) -> dict[str, Any]:
    """Generate one item's answer; the record to store (with `error` set when the item's input is unusable)."""
    record: dict[str, Any] = {"id": item.item_id, "reference": item.reference, "error": item.error}
    if item.error is not None or item.make_conversation is None:
        record["error"] = item.error or "no conversation"
        return record
    started = time.perf_counter()
    try:
        conversation = item.make_conversation()
        record["context"] = [
            {"role": turn.role, "content": turn.content,
             "images": [str(conversation.image_path(image)) if isinstance(image, str) else None
                        for image in turn.image_list]}
            for turn in conversation.turns
        ]
        done = generator.generate(conversation, config)
    except DataError as error:
        record["error"] = str(error)
        return record
    turn = done.turn
    images: list[str | None] = []
    for number, image in enumerate(turn.image_list):
        if image is None:
            images.append(None)
            continue
        relative = f"images/{safe_name(item.item_id)}_{number}.png"
        (directory / "images").mkdir(parents=True, exist_ok=True)
        image.save(directory / relative)
        images.append(relative)
    record["prediction"] = {
        "content": turn.content,
        "captions": list(turn.caption_list),
        "images": images,
        "finish_reason": done.finish_reason,
        "num_tokens": len(done.token_ids),
    }
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def run_benchmark(
    generator: Any,
    benchmark: Benchmark,
    output_dir: str | os.PathLike,
    config: DecodingConfig,
    *,
    limit: int = 0,
    restart: bool = False,
    progress: bool = True,
    run_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer the benchmark's items not yet in predictions.jsonl, score all of them, write report.json.

    `generator` is an InterleavedGenerator (anything with its `generate(conversation, config)`);
    `run_settings` (the model setup) joins the benchmark's settings in run.json. Returns the report.
    """
    directory = Path(output_dir) / benchmark.name
    directory.mkdir(parents=True, exist_ok=True)
    config = benchmark.generation_config(config)
    items = benchmark.items()
    if limit:
        items = items[:limit]
    settings = {"benchmark": benchmark.name, "data": benchmark.settings(), "generation": asdict(config),
                "model": run_settings or {}, "limit": limit}
    _check_run_settings(directory, json.loads(json.dumps(settings, default=str)), restart)
    predictions_path = directory / PREDICTIONS_FILE
    done = read_predictions(predictions_path)
    todo = [item for item in items if item.item_id not in done]
    if done:
        logger.info("%s: %d of %d items already answered; answering the other %d",
                    benchmark.name, len(items) - len(todo), len(items), len(todo))
    with logging_redirect_tqdm(), open(predictions_path, "a", encoding="utf-8") as file:
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=benchmark.name, unit="item",
                   disable=not progress, dynamic_ncols=True)
        for item in todo:
            record = answer_item(generator, item, config, directory)
            if record["error"]:
                logger.warning("%s item %s failed: %s", benchmark.name, item.item_id, record["error"])
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()  # each finished item survives a crash of the next one
            done[item.item_id] = record
            bar.update(1)
        bar.close()
    records = [done[item.item_id] for item in items]
    return write_report(benchmark, records, directory, settings)


def write_report(benchmark: Benchmark, records: list[dict[str, Any]], directory: Path,
                 settings: dict[str, Any]) -> dict[str, Any]:
    scores = benchmark.score(records, directory)
    failed = [record["id"] for record in records if record.get("error")]
    report = {
        "benchmark": benchmark.name,
        "num_items": len(records),
        "num_failed": len(failed),
        "failed_items": failed[:100],
        "metrics": {name: metric.as_dict() for name, metric in scores.metrics.items()},
        "details": scores.details,
        "ranking_metric": scores.ranking_metric,
        "item_scores": scores.item_scores,
        "settings": json.loads(json.dumps(settings, default=str)),
    }
    atomic_write_json(directory / REPORT_FILE, report)
    logger.info("%s: wrote %s", benchmark.name, directory / REPORT_FILE)
    return report


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Path, size and modification time of a data file: an edited file does not resume old predictions."""
    file = Path(path)
    try:
        status = file.stat()
    except OSError:
        return {"path": str(file)}
    return {"path": str(file.resolve()), "size": status.st_size, "modified_ns": status.st_mtime_ns}
