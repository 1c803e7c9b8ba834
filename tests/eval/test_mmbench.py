"""MMBench on a small fixture TSV: options from their columns, answer extraction, CircularEval, submission."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from textbind.eval.config import EvalConfig
from textbind.eval.harness import run_benchmark
from textbind.eval.mmbench import MMBench, extract_choice, read_tsv, rotate
from textbind.generation import DecodingConfig

# The image column first and the options after `answer`: options must be read by column name.
HEADER = ["image", "index", "question", "hint", "answer", "A", "B", "C", "D", "category", "l2-category", "split"]


def _png_base64(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path, with_answers: bool) -> None:
    rows = [
        # index 1: the model names the right option's text: right in every rotation.
        [_png_base64((220, 20, 20)), "1", "Which colour is shown?", "", "A", "red", "green", "blue", "yellow",
         "colour", "perception", "dev"],
        # index 2: the model always says "A": right only unrotated (vanilla), wrong under CircularEval.
        [_png_base64((20, 220, 20)), "2", "Which letter comes first?", "Think of the alphabet.", "A",
         "a", "b", "c", "nan", "shape", "reasoning", "dev"],
        # index 3: the image cell refers to row 1; the model answers "(X)" with the letter of "square".
        ["1", "3", "Which shape?", "", "B", "circle", "square", "", "", "shape", "perception", "dev"],
        # index 4: an answer that is not among its options: failed.
        [_png_base64((0, 0, 0)), "4", "Broken?", "", "E", "yes", "no", "", "", "other", "reasoning", "dev"],
    ]
    header = HEADER if with_answers else [c for c in HEADER if c != "answer"]
    lines = ["\t".join(header)]
    for row in rows:
        cells = dict(zip(HEADER, row))
        lines.append("\t".join(cells[c] for c in header))
    path.write_text("\n".join(lines) + "\n")


def _options_in(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-H])\. (.*)$", prompt, re.MULTILINE))


def _answer(conversation) -> str:
    prompt = conversation.turns[-1].content
    options = _options_in(prompt)
    if "colour" in prompt:
        return "It is red."
    if "alphabet" in prompt:
        return "A"
    if "shape" in prompt:
        return "(" + next(letter for letter, text in options.items() if text == "square") + ")"
    return "B"


def test_answer_extraction():
    options = {"A": "a red circle", "B": "a blue square", "C": "nothing", "D": "red"}
    assert extract_choice("B", options) == "B"
    assert extract_choice("(C) nothing at all", options) == "C"
    assert extract_choice("D.", options) == "D"
    assert extract_choice("The answer is B.", options) == "B"
    assert extract_choice("Answer: c", options) == "C"
    assert extract_choice("I see a blue square.", options) == "B"  # the option's text
    assert extract_choice("A red circle, clearly.", options) == "A"  # longest text wins over "red"
    assert extract_choice("A dog is sleeping", options) == ""  # the article is not option A
    assert extract_choice("I cannot tell", options) == ""
    assert extract_choice("", options) == ""


def test_rotation_and_options_from_their_columns(tmp_path):
    path = tmp_path / "mmbench_dev.tsv"
    _write_tsv(path, with_answers=True)
    rows = read_tsv(path)
    assert [rows[1][letter] for letter in "ABCD"] == ["a", "b", "c", "nan"]
    rotated, answer = rotate({"A": "x", "B": "y", "C": "z"}, "C", 1)
    assert rotated == {"A": "y", "B": "z", "C": "x"} and answer == "B"


def test_circular_eval_scored_by_hand(tmp_path, scripted):
    path = tmp_path / "mmbench_dev.tsv"
    _write_tsv(path, with_answers=True)
    answerer = scripted(_answer)
    report = run_benchmark(answerer, MMBench(str(path), EvalConfig()), tmp_path / "out", DecodingConfig(),
                           progress=False)
    # Items: 4 + 3 + 2 rotations, and the broken question once. Asked: 9.
    assert report["num_items"] == 10 and report["num_failed"] == 1 and answerer.calls == 9
    metrics = report["metrics"]
    # Circular: question 1 right, 2 wrong (rotations 1 and 2), 3 right, 4 failed -> 2 / 4.
    assert metrics["accuracy"]["value"] == 50 and metrics["accuracy"]["count"] == 4
    # Vanilla (unrotated only): 1, 2 and 3 right -> 3 / 4.
    assert metrics["vanilla_accuracy"]["value"] == 75
    details = report["details"]
    assert details["per_category"] == {"colour": {"accuracy": 100, "count": 1}, "other": {"accuracy": 0, "count": 1},
                                       "shape": {"accuracy": 50, "count": 2}}
    assert details["per_l2_category"]["perception"] == {"accuracy": 100, "count": 2}
    assert details["per_l2_category"]["reasoning"] == {"accuracy": 0, "count": 2}


def test_test_split_writes_the_submission(tmp_path, scripted):
    openpyxl = pytest.importorskip("openpyxl")
    path = tmp_path / "mmbench_test.tsv"
    _write_tsv(path, with_answers=False)
    report = run_benchmark(scripted(_answer), MMBench(str(path), EvalConfig()), tmp_path / "out",
                           DecodingConfig(), progress=False)
    assert report["num_items"] == 4 and "accuracy" not in report["metrics"]
    sheet = openpyxl.load_workbook(report["details"]["submission"]).active
    rows = [[cell.value for cell in row] for row in sheet.iter_rows()]
    header = rows[0]
    assert "image" not in header and header[-1] == "prediction"
    by_index = {row[header.index("index")]: row for row in rows[1:]}
    assert {index: row[-1] for index, row in by_index.items()} == {"1": "A", "2": "A", "3": "B", "4": "B"}
    assert by_index["2"][header.index("hint")] == "Think of the alphabet."
