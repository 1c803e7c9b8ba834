"""The engine's bookkeeping files: JSONL reading and the sections of OUTPUT_DIR/report.json."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from textbind.io import atomic_write_json

REPORT_NAME = "report.json"


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
    atomic_write_json(path, report)
    return report
