"""MMBench: multiple-choice questions from the official TSV, answer extraction, CircularEval, submission file.

Data (`--data` is the TSV, e.g. `MMBench_DEV_EN.tsv`): columns `index`, `question`, `hint`, `A`..`D`
(some rows have fewer options; an empty cell or `nan` is no option), `answer` (dev split only),
`category`, `l2-category`, `image` (base64; a short value is the `index` of the row holding the
image, as MMBench stores repeated images). Options are read from their own columns by name.

Prompt: `<image>` + hint (if any) + question + one `X. option` line per option + eval.mmbench_instruction.

CircularEval (eval.circular, where answers are known): a question with k options is asked k times,
its options rotated by 0..k-1 places; it counts as right only if every rotation is answered right.
`accuracy` is the circular accuracy then, `vanilla_accuracy` that of the unrotated questions alone.
Without answers (test split) only the unrotated questions are asked and `submission.xlsx` (or
`submission.csv` without openpyxl) is written: the TSV's columns (no image) plus `prediction`.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import re
import string
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from textbind.data.conversation import Conversation, DataError, Turn
from textbind.eval.config import EvalConfig
from textbind.eval.harness import EvalItem, Metric, Scores, file_fingerprint
from textbind.eval.metrics import mean_interval
from textbind.generation import DecodingConfig

logger = logging.getLogger(__name__)

OPTION_LETTERS = tuple(string.ascii_uppercase[:8])  # MMBench uses A-D; other TSVs of its format go further
REQUIRED_COLUMNS = ("index", "question", "A", "B")


def _cell(row: dict[str, str], column: str) -> str:
    value = (row.get(column) or "").strip()
    return "" if value.lower() == "nan" else value


def read_tsv(path: Path) -> list[dict[str, str]]:
    """The rows of an MMBench TSV as dicts keyed by the header's column names."""
    if not path.is_file():
        raise DataError(f"{path}: no such MMBench TSV file")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        return list(reader)


def options_of(row: dict[str, str]) -> dict[str, str]:
    """Letter -> option text, from the option columns that hold text (in letter order)."""
    return {letter: _cell(row, letter) for letter in OPTION_LETTERS if _cell(row, letter)}


def rotate(options: dict[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Options moved `shift` places (letter i gets the text of letter i+shift) and the answer's new letter."""
    letters = list(options)
    texts = [options[letter] for letter in letters]
    count = len(letters)
    rotated = {letters[i]: texts[(i + shift) % count] for i in range(count)}
    new_answer = letters[(letters.index(answer) - shift) % count] if answer in options else ""
    return rotated, new_answer


def build_prompt(question: str, hint: str, options: dict[str, str], instruction: str) -> str:
    parts = ["<image>"]
    if hint:
        parts.append(hint)
    parts.append(question)
    parts += [f"{letter}. {text}" for letter, text in options.items()]
    if instruction:
        parts.append(instruction)
    return "\n".join(parts)


def extract_choice(answer: str, options: dict[str, str]) -> str:
    """The option letter an answer names, or "" (counted wrong). In order:
    1. the answer is a letter alone or leads with one: "B", "B.", "(B)", "B) a dog", "B: ...";
    2. "answer is B", "Answer: B", "option B" anywhere;
    3. exactly one option's text occurs in the answer (case-insensitive; the longest wins when one
       option's text contains another's);
    4. exactly one option letter stands alone as a word (a leading article "A" is not taken for one).
    """
    text = answer.strip()
    letters = "".join(options)
    if not text or not letters:
        return ""
    match = re.match(rf"^[\(\[]?([{letters}])(?:[\)\]\.:,]|\s|$)", text)
    if match and not (match.group(1) == "A" and re.match(r"^A\s+[a-z]", text)):
        return match.group(1)
    match = re.search(rf"(?:answer(?: is)?|option|choice)\s*[:\-]?\s*[\(\[]?([{letters}])\b", text, re.IGNORECASE)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    lowered = text.lower()
    found = [letter for letter, option in options.items() if option.lower() in lowered]
    found = [letter for letter in found
             if not any(other != letter and options[letter].lower() in options[other].lower() for other in found)]
    if len(found) == 1:
        return found[0]
    standalone = set(re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text))
    if text.startswith("A ") and len(text.split()) > 2:
        standalone.discard("A")  # "A dog ..." is an article
    if len(standalone) == 1:
        return standalone.pop()
    return ""


def _decode_image(encoded: str, source: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(encoded, validate=False))).convert("RGB")
    except (OSError, ValueError) as error:
        raise DataError(f"{source}: the image cell is not a readable base64 image ({error})") from error


class MMBench:
    name = "mmbench"

    def __init__(self, data_path: str, options: EvalConfig) -> None:
        self.path = Path(data_path)
        self.options = options
        self._rows: list[dict[str, str]] | None = None
        self._by_index: dict[str, dict[str, str]] | None = None

    def rows(self) -> list[dict[str, str]]:
        if self._rows is None:
            self._rows = read_tsv(self.path)
        return self._rows

    def settings(self) -> dict[str, Any]:
        return {"file": file_fingerprint(self.path), "circular": self.options.circular,
                "instruction": self.options.mmbench_instruction}

    def generation_config(self, config: DecodingConfig) -> DecodingConfig:
        return replace(config, max_images=0)  # a letter is asked for; an image cannot be scored

    def has_answers(self) -> bool:
        return all(_cell(row, "answer") for row in self.rows())

    def _conversation(self, row: dict[str, str], options: dict[str, str], source: str) -> Conversation:
        encoded = _cell(row, "image")
        if len(encoded) <= 64:  # a reference to the row that holds the image
            if self._by_index is None:
                self._by_index = {_cell(other, "index"): other for other in self.rows()}
            target = self._by_index.get(encoded)
            if target is None or len(_cell(target, "image")) <= 64:
                raise DataError(f"{source}: image cell {encoded!r} is neither an image nor the index of a row with one")
            encoded = _cell(target, "image")
        image = _decode_image(encoded, source)
        prompt = build_prompt(_cell(row, "question"), _cell(row, "hint"), options, self.options.mmbench_instruction)
        return Conversation([Turn("user", prompt, [image])], source=source)

    def items(self) -> list[EvalItem]:
        rows = self.rows()
        circular = self.options.circular and self.has_answers()
        items = []
        for number, row in enumerate(rows, start=2):  # line 1 is the header
            index = _cell(row, "index") or f"line{number}"
            source = f"{self.path} line {number} (index {index})"
            options = options_of(row)
            answer = _cell(row, "answer").upper()
            base = {"index": index, "category": _cell(row, "category"), "l2_category": _cell(row, "l2-category"),
                    "question": _cell(row, "question"), "hint": _cell(row, "hint")}
            if len(options) < 2 or (answer and answer not in options):
                items.append(EvalItem(index, None, {**base, "options": options, "answer": answer, "rotation": 0},
                                      error=f"{source}: needs at least two options and an answer among them; "
                                            f"got options {list(options)} and answer {answer!r}"))
                continue
            for shift in range(len(options) if circular else 1):
                rotated, rotated_answer = rotate(options, answer, shift)
                reference = {**base, "options": rotated, "answer": rotated_answer, "rotation": shift}
                item_id = index if shift == 0 else f"{index}@{shift}"
                items.append(EvalItem(item_id, partial(self._conversation, row, rotated, source), reference))
        return items

    def score(self, records: list[dict[str, Any]], output_dir: Path) -> Scores:
        item_scores: dict[str, dict[str, float]] = {}
        questions: dict[str, list[bool]] = {}
        vanilla: dict[str, bool] = {}
        meta: dict[str, dict[str, str]] = {}
        predictions: dict[str, str] = {}
        for record in records:
            reference = record["reference"]
            content = "" if record.get("error") else (record.get("prediction") or {}).get("content", "")
            choice = extract_choice(content, reference.get("options", {}))
            right = bool(reference.get("answer")) and choice == reference["answer"]
            item_scores[record["id"]] = {"correct": float(right)}
            questions.setdefault(reference["index"], []).append(right)
            meta[reference["index"]] = reference
            if reference.get("rotation", 0) == 0:
                vanilla[reference["index"]] = right
                predictions[reference["index"]] = choice
        metrics: dict[str, Metric] = {}
        details: dict[str, Any] = {}
        if records and all(meta[index].get("answer") for index in meta):
            circular_right = {index: all(marks) for index, marks in questions.items()}
            values = [float(v) for v in circular_right.values()]
            metrics["accuracy"] = Metric(100 * sum(values) / len(values), len(values),
                                         _scaled(mean_interval(values, self.options.bootstrap_seed)))
            metrics["vanilla_accuracy"] = Metric(100 * sum(vanilla.values()) / max(1, len(vanilla)), len(vanilla))
            for field, key in (("category", "per_category"), ("l2_category", "per_l2_category")):
                groups: dict[str, list[bool]] = {}
                for index, right in circular_right.items():
                    groups.setdefault(meta[index].get(field) or "(none)", []).append(right)
                details[key] = {name: {"accuracy": 100 * sum(marks) / len(marks), "count": len(marks)}
                                for name, marks in sorted(groups.items())}
                for name, row in details[key].items():
                    metrics[f"{field}/{name}"] = Metric(row["accuracy"], row["count"])
        else:
            details["submission"] = str(write_submission(self.rows(), predictions, output_dir))
        return Scores(metrics, item_scores, details, "correct")


def _scaled(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if interval is None else (100 * interval[0], 100 * interval[1])


def write_submission(rows: list[dict[str, str]], predictions: dict[str, str], output_dir: Path) -> Path:
    """The test-split submission: the TSV's columns without the image, plus `prediction` (the letter)."""
    columns = [column for column in rows[0] if column != "image"] + ["prediction"] if rows else ["prediction"]
    table = [[row.get(column, "") for column in columns[:-1]] + [predictions.get(_cell(row, "index"), "")]
             for row in rows]
    try:
        from openpyxl import Workbook
    except ImportError:
        path = output_dir / "submission.csv"
        logger.warning("openpyxl is not installed: writing %s instead of an .xlsx file", path)
        with open(path, "w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows(table)
        return path
    workbook = Workbook()
    sheet = workbook.active
    sheet.append(columns)
    for line in table:
        sheet.append(line)
    path = output_dir / "submission.xlsx"
    workbook.save(path)
    return path


def build_benchmark(data_path: str, options: EvalConfig) -> MMBench:
    return MMBench(data_path, options)
