"""MME: yes/no questions on 14 subtasks, official result files and the official score computed locally.

Data (`--data` is the benchmark folder, e.g. `MME_Benchmark_release_version/`), per subtask folder:
- `images/` + `questions_answers_YN/` (artwork, celebrity, landmark, posters, scene), or
- images and question files side by side (the flat layout of the other subtasks).
A question file `<image stem>.txt` holds one `question<TAB>Yes|No` line per question (two per image).

Results: `OUTPUT_DIR/mme/results/<subtask>.txt`, one `image<TAB>question<TAB>ground truth<TAB>prediction`
line per question, the format MME's `eval_tool/calculation.py` reads. Each line holds its own item's
answer (tabs and newlines turned into spaces); a failed item has an empty prediction (scored wrong).

Score (MME's calculation.py): a prediction is read as yes/no by `extract_yes_no`; per subtask,
acc = right answers / questions, acc+ = images whose questions are all right / images,
score = 100 acc + 100 acc+; perception = sum of the 10 perception subtask scores (max 2000),
cognition = sum of the 4 cognition subtask scores (max 800).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from textbind.data.conversation import Conversation, DataError, Turn
from textbind.eval.config import EvalConfig
from textbind.eval.harness import EvalItem, Metric, Scores
from textbind.generation import DecodingConfig
from textbind.io import atomic_write_json

logger = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORIES = {"perception": PERCEPTION, "cognition": COGNITION}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
RESULTS_DIR = "results"
SCORE_FILE = "mme_score.json"


def extract_yes_no(prediction: str) -> str:
    """"yes", "no" or "other", by MME's official rule: the lower-cased answer if it is exactly yes or no;
    else "yes" if the first four characters contain "yes", else "no" if they contain "no", else "other".

    So "Yes, there is a dog." -> yes, "No." -> no, "There is a dog" -> other (wrong whatever the truth),
    and, as in the official tool, "Not sure" -> no ("not " holds "no"). Surrounding whitespace is stripped.
    """
    answer = prediction.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _single_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _conversation(image: Path, question: str, instruction: str, source: str) -> Conversation:
    if not image.is_file():
        raise DataError(f"{source}: image file {image} not found")
    prompt = f"<image>\n{question}" + (f" {instruction}" if instruction else "")
    return Conversation([Turn("user", prompt, [str(image)])], source=source)


class MME:
    name = "mme"

    def __init__(self, data_path: str, options: EvalConfig) -> None:
        self.root = Path(data_path)
        self.options = options

    def settings(self) -> dict[str, Any]:
        return {"path": str(self.root.resolve()), "instruction": self.options.mme_instruction}

    def generation_config(self, config: DecodingConfig) -> DecodingConfig:
        return replace(config, max_images=0)  # a yes/no answer has no image to score

    def subtask_folders(self) -> list[Path]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such MME folder")
        folders = [folder for folder in sorted(self.root.iterdir())
                   if folder.is_dir() and folder.name in PERCEPTION + COGNITION]
        if not folders:
            expected = ", ".join(PERCEPTION + COGNITION)
            raise DataError(f"{self.root}: no MME subtask folder (expected some of {expected})")
        return folders

    def items(self) -> list[EvalItem]:
        items = []
        for folder in self.subtask_folders():
            subtask = folder.name
            if (folder / "questions_answers_YN").is_dir():
                question_dir, image_dir = folder / "questions_answers_YN", folder / "images"
            else:
                question_dir = image_dir = folder
            for question_file in sorted(question_dir.glob("*.txt")):
                image = _find_image(image_dir, question_file.stem)
                image_name = image.name if image else f"{question_file.stem}.jpg"
                lines = question_file.read_text(encoding="utf-8", errors="replace").splitlines()
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    source = f"{question_file} line {number}"
                    item_id = f"{subtask}/{image_name}#{number}"
                    question, _, answer = line.rpartition("\t")
                    reference = {"subtask": subtask, "image": image_name, "question": question.strip(),
                                 "answer": answer.strip()}
                    if not question.strip() or answer.strip().lower() not in ("yes", "no"):
                        items.append(EvalItem(item_id, None, reference,
                                              error=f"{source}: expected 'question<TAB>Yes|No', got {line!r}"))
                        continue
                    path = image if image else image_dir / image_name
                    items.append(EvalItem(item_id, partial(_conversation, path, question.strip(),
                                                           self.options.mme_instruction, source), reference))
        return items

    def score(self, records: list[dict[str, Any]], output_dir: Path) -> Scores:
        results = output_dir / RESULTS_DIR
        write_results(records, results)
        table = score_results(results)
        metrics = {
            "perception": Metric(table["perception"], table["num_questions"]["perception"]),
            "cognition": Metric(table["cognition"], table["num_questions"]["cognition"]),
        }
        for subtask, row in table["subtasks"].items():
            metrics[f"{subtask}/score"] = Metric(row["score"], row["questions"])
        item_scores = {}
        for record in records:
            prediction = (record.get("prediction") or {}).get("content", "")
            right = not record.get("error") and extract_yes_no(prediction) == record["reference"]["answer"].lower()
            item_scores[record["id"]] = {"correct": float(right)}
        return Scores(metrics, item_scores, {"subtasks": table["subtasks"]}, "correct")


def write_results(records: list[dict[str, Any]], results_dir: Path) -> None:
    """One official `<subtask>.txt` per subtask; each line from its own record only."""
    lines: dict[str, list[str]] = {}
    for record in records:
        reference = record["reference"]
        if "subtask" not in reference or reference.get("answer", "").lower() not in ("yes", "no"):
            continue  # a malformed question line: counted as failed in report.json, not an official line
        prediction = "" if record.get("error") else (record.get("prediction") or {}).get("content", "")
        fields = [reference["image"], reference["question"], reference["answer"], prediction]
        lines.setdefault(reference["subtask"], []).append("\t".join(_single_line(field) for field in fields))
    results_dir.mkdir(parents=True, exist_ok=True)
    for subtask, subtask_lines in lines.items():
        (results_dir / f"{subtask}.txt").write_text("\n".join(subtask_lines) + "\n", encoding="utf-8")


def score_results(results_dir: str | Path) -> dict[str, Any]:
    """The official MME score of a results folder (`<subtask>.txt` files); also written to mme_score.json."""
    results = Path(results_dir)
    files = {path.stem: path for path in sorted(results.glob("*.txt")) if path.stem in PERCEPTION + COGNITION}
    if not files:
        raise DataError(f"{results}: no MME result file (<subtask>.txt for a subtask of {PERCEPTION + COGNITION})")
    subtasks: dict[str, dict[str, Any]] = {}
    for subtask, path in files.items():
        images: dict[str, list[bool]] = {}
        right = questions = 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 3 or fields[2].strip().lower() not in ("yes", "no"):
                raise DataError(f"{path} line {number}: expected image, question, Yes|No, prediction "
                                f"(tab-separated), got {line!r}")
            image, ground_truth = fields[0], fields[2].strip().lower()
            prediction = fields[3] if len(fields) > 3 else ""
            correct = extract_yes_no(prediction) == ground_truth
            right += correct
            questions += 1
            images.setdefault(image, []).append(correct)
        acc = right / questions if questions else 0.0
        acc_plus = sum(all(marks) for marks in images.values()) / len(images) if images else 0.0
        subtasks[subtask] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
                             "questions": questions, "images": len(images),
                             "category": "perception" if subtask in PERCEPTION else "cognition"}
    table: dict[str, Any] = {"subtasks": subtasks, "num_questions": {}}
    for category, names in CATEGORIES.items():
        table[category] = sum(subtasks[name]["score"] for name in names if name in subtasks)
        table["num_questions"][category] = sum(subtasks[name]["questions"] for name in names if name in subtasks)
        missing = [name for name in names if name not in subtasks]
        if missing:
            table.setdefault("missing_subtasks", []).extend(missing)
    atomic_write_json(results / SCORE_FILE, table)
    return table


def format_table(table: dict[str, Any]) -> str:
    lines = [f"{'subtask':<24}{'acc':>8}{'acc+':>8}{'score':>9}{'questions':>11}"]
    for category in CATEGORIES:
        for name, row in table["subtasks"].items():
            if row["category"] == category:
                lines.append(f"{name:<24}{row['acc']:8.2f}{row['acc_plus']:8.2f}{row['score']:9.2f}"
                             f"{row['questions']:11d}")
        lines.append(f"{category.upper() + ' total':<40}{table[category]:9.2f}")
    if table.get("missing_subtasks"):
        lines.append(f"(missing subtasks, counted as 0: {', '.join(table['missing_subtasks'])})")
    return "\n".join(lines)


def score_command(results_dir: str) -> int:
    """`textbind eval mme --score RESULTS_DIR`: print the table, write RESULTS_DIR/mme_score.json."""
    table = score_results(results_dir)
    print(format_table(table))
    print(f"wrote {Path(results_dir) / SCORE_FILE}")
    return 0


def build_benchmark(data_path: str, options: EvalConfig) -> MME:
    return MME(data_path, options)

