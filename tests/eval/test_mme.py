"""MME on a small fixture benchmark (both folder layouts), scored by hand; yes/no extraction; --score."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from textbind.eval.cli import main as eval_main
from textbind.eval.config import EvalConfig
from textbind.eval.harness import read_predictions, run_benchmark
from textbind.eval.mme import MME, extract_yes_no, score_results
from textbind.generation import DecodingConfig

# question -> the scripted model's answer; ground truths in the files below.
ANSWERS = {
    "Is there a dog?": "Yes, there is.",  # gt Yes: right
    "Is there a cat?": "No",  # gt No: right
    "Is it red?": "There is a red thing",  # gt Yes: neither yes nor no -> wrong
    "Is it blue?": "no.",  # gt No: right
    "Is this by Monet?": "yes",  # gt Yes: right
    "Is this by Dali?": "Yes",  # gt No: wrong
    "Does it print 3?": "Not sure",  # gt No: the official rule reads "not " as no -> right
    "Does it print 4?": "YES!",  # gt Yes: right
    "How many? one": "Yes",  # image missing: failed
    "How many? two": "No",
}


def _image(path):
    Image.new("RGB", (32, 32), (100, 150, 200)).save(path)


@pytest.fixture
def mme_dir(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    existence = root / "existence"  # the flat layout: images and question files side by side
    existence.mkdir(parents=True)
    _image(existence / "1.jpg")
    (existence / "1.txt").write_text("Is there a dog?\tYes\nIs there a cat?\tNo\n")
    _image(existence / "2.png")
    (existence / "2.txt").write_text("Is it red?\tYes\nIs it blue?\tNo\n")
    artwork = root / "artwork"  # images/ + questions_answers_YN/
    (artwork / "images").mkdir(parents=True)
    (artwork / "questions_answers_YN").mkdir()
    _image(artwork / "images" / "10.jpg")
    (artwork / "questions_answers_YN" / "10.txt").write_text(
        "Is this by Monet?\tYes\nIs this by Dali?\tNo\na line without its answer\n")
    code = root / "code_reasoning"
    code.mkdir()
    _image(code / "c.png")
    (code / "c.txt").write_text("Does it print 3?\tNo\nDoes it print 4?\tYes\n")
    count = root / "count"
    count.mkdir()
    (count / "gone.txt").write_text("How many? one\tYes\nHow many? two\tNo\n")  # its image is missing
    (root / "not_a_subtask").mkdir()
    return root


def test_yes_no_extraction():
    assert extract_yes_no("Yes") == "yes" and extract_yes_no(" no\n") == "no"
    assert extract_yes_no("Yes, there is a dog.") == "yes"
    assert extract_yes_no("No, it is not.") == "no"
    assert extract_yes_no("There is no dog.") == "other"  # only the first four characters count
    assert extract_yes_no("") == "other"
    assert extract_yes_no("Not sure") == "no"  # the official tool's reading, kept for comparable scores


def test_mme_run_and_official_score(mme_dir, tmp_path, scripted):
    answerer = scripted(lambda conversation: ANSWERS[conversation.turns[-1].content.split("\n", 1)[1]])
    report = run_benchmark(answerer, MME(str(mme_dir), EvalConfig()), tmp_path / "out", DecodingConfig(),
                           progress=False)
    # By hand. existence: 3 of 4 right (acc 75), image 1 fully right of 2 (acc+ 50) -> 125.
    # artwork: 1 of 2 (50), 0 of 1 image -> 50. count: both failed -> 0. code_reasoning: 2/2, 1/1 -> 200.
    subtasks = report["details"]["subtasks"]
    assert subtasks["existence"]["acc"] == 75 and subtasks["existence"]["acc_plus"] == 50
    assert subtasks["existence"]["score"] == 125
    assert subtasks["artwork"]["score"] == 50 and subtasks["count"]["score"] == 0
    assert subtasks["code_reasoning"]["score"] == 200
    assert report["metrics"]["perception"]["value"] == 175 and report["metrics"]["cognition"]["value"] == 200
    assert report["metrics"]["perception"]["count"] == 8  # existence 4 + artwork 2 + count 2 questions
    assert report["num_failed"] == 3  # two questions without their image, one malformed line
    assert answerer.calls == 8

    # Official result files: one line per question, each with its own item's answer; a failed item has an
    # empty prediction (never the previous line's).
    results = tmp_path / "out" / "mme" / "results"
    count_lines = (results / "count.txt").read_text().splitlines()
    assert [line.split("\t") for line in count_lines] == [
        ["gone.jpg", "How many? one", "Yes", ""], ["gone.jpg", "How many? two", "No", ""]]
    existence_lines = [line.split("\t") for line in (results / "existence.txt").read_text().splitlines()]
    assert [fields[3] for fields in existence_lines] == ["Yes, there is.", "No", "There is a red thing", "no."]
    assert [fields[0] for fields in existence_lines] == ["1.jpg", "1.jpg", "2.png", "2.png"]
    assert "count/gone.jpg#1" in read_predictions(tmp_path / "out" / "mme" / "predictions.jsonl")


def test_score_command_on_any_results_folder(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    # Another model's answers: OCR 4 questions on 2 images: 3 right, 1 image fully right -> 75 + 50.
    (results / "OCR.txt").write_text(
        "a.jpg\tIs it A?\tYes\tYes\na.jpg\tIs it B?\tNo\tNo\nb.jpg\tIs it C?\tYes\tNo\nb.jpg\tIs it D?\tNo\tno\n")
    (results / "text_translation.txt").write_text("t.png\tQ1\tYes\tyes\nt.png\tQ2\tNo\tI think so\n")
    assert eval_main(["mme", "--score", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "PERCEPTION total" in printed and "125.00" in printed
    score = json.loads((results / "mme_score.json").read_text())
    assert score["perception"] == 125 and score["cognition"] == 50
    assert score["subtasks"]["OCR"] == {**score["subtasks"]["OCR"], "acc": 75, "acc_plus": 50, "score": 125}
    assert score["subtasks"]["text_translation"]["acc_plus"] == 0
    (results / "OCR.txt").write_text("a.jpg\tIs it A?\tMaybe\tYes\n")
    with pytest.raises(Exception, match="OCR.txt line 1"):
        score_results(results)
