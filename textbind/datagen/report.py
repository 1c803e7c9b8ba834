"""The engine's bookkeeping files: atomic JSON writes, JSONL reading, and OUTPUT_DIR/report.json sections."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPORT_NAME = "report.json"


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write `value` as indented JSON, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON record per line, atomically; return how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    count = 0
    with open(temporary, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(temporary, path)
    return count


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                yield json.loads(line)


def update_report(output_dir: str | os.PathLike, section: str, values: Any) -> dict:
    """Set one step's section of OUTPUT_DIR/report.json (the other steps' sections stay)."""
    path = Path(output_dir) / REPORT_NAME
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    report[section] = values
    write_json(path, report)
    return report
