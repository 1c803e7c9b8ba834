"""The toy world's held-out evaluation as a harness benchmark: scoring, the eval.json fields, layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from textbind.data.conversation import Turn
from textbind.eval.config import EvalConfig
from textbind.eval.harness import run_benchmark
from textbind.eval.registry import build_benchmark
from textbind.generation import DecodingConfig
from textbind.toy.datagen import write_eval_sets
from textbind.toy.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy_eval")
    write_eval_sets(directory, num_describe=6, num_draw=6, seed=0)
    return directory


def _oracle(eval_dir: Path, wrong: bool = False):
    """Answers every toy item as the data says it should be answered (or with one attribute wrong)."""
    scenes = {str(eval_dir / item["image"]): item["scene"]
              for item in json.loads((eval_dir / "describe.json").read_text())}
    expected = {json.dumps(item["conversation"]): item["expected_caption"]
                for item in json.loads((eval_dir / "draw.json").read_text())}

    def answer(conversation):
        last = conversation.turns[-1]
        if len(conversation.turns) == 1 and last.content.startswith("Describe this image"):
            scene = scenes[last.image_list[0]]
            return Turn("assistant", f"The image shows {_spoil(scene) if wrong else scene}.")
        for key, caption in expected.items():
            if json.loads(key)[-1]["content"] == last.content and len(json.loads(key)) == len(conversation.turns):
                return Turn("assistant", "Here it is: <image>", [None], [_spoil(caption) if wrong else caption])
        raise AssertionError(f"unexpected request {last.content!r}")

    return answer


def _spoil(caption: str) -> str:
    for before, after in (("small", "large"), ("large", "small")):
        if before in caption:
            return caption.replace(before, after, 1)
    raise AssertionError(caption)


def test_toy_benchmark_scores_right_and_wrong_answers(eval_dir, tmp_path, scripted):
    benchmark = build_benchmark("toy", str(eval_dir), EvalConfig())
    right = run_benchmark(scripted(_oracle(eval_dir)), benchmark, tmp_path / "right", DecodingConfig(),
                          progress=False)
    metrics = right["metrics"]
    assert right["num_items"] == 12
    assert metrics["caption_attribute_accuracy"] == {"value": 1.0, "count": 6}
    assert metrics["describe_colour_accuracy"]["value"] == 1.0
    assert metrics["drawing_accuracy"] == {"value": 1.0, "count": 6}
    kinds = right["details"]["drawing_by_kind"]
    assert set(kinds) <= {"draw", "edit"} and all(value == 1.0 for value in kinds.values())
    edits = right["details"]["edits_by_kind"]
    assert edits and sum(counts["total"] for counts in edits.values()) == metrics["drawing_by_kind/edit"]["count"]
    assert all(counts["right"] == counts["total"] for counts in edits.values())
    wrong = run_benchmark(scripted(_oracle(eval_dir, wrong=True)), benchmark, tmp_path / "wrong",
                          DecodingConfig(), progress=False)
    assert wrong["metrics"]["caption_attribute_accuracy"]["value"] == 0.0
    assert wrong["metrics"]["describe_colour_accuracy"]["value"] == 1.0  # colours were left right
    assert wrong["metrics"]["drawing_accuracy"]["value"] == 0.0
    assert all(counts["right"] == 0 for counts in wrong["details"]["edits_by_kind"].values())
    assert len(wrong["details"]["describe_failures"]) == 6


def test_edits_are_told_apart_by_what_they_change():
    from textbind.toy.benchmark import _edit_kind

    def turns(*captions):
        return [{"role": "user", "content": "Draw it.", "image_list": [], "caption_list": []}] + [
            {"role": "assistant", "content": "<image>", "image_list": ["x.png"], "caption_list": [caption]}
            for caption in captions]

    pair = "a small red circle on the left and a large blue square on the right"
    assert _edit_kind(turns("a large red circle", pair), "a large green square on the left and a small red "
                      "circle on the right") == "unknown"  # two changes: not one edit
    recoloured = "a small green circle on the left and a large blue square on the right"
    assert _edit_kind(turns(pair), recoloured) == "colour/2"
    assert _edit_kind(turns(pair), "a large blue square on the left and a small red circle on the right") == "swap/2"
    assert _edit_kind(turns("a small red circle"), pair) == "add/1"
    assert _edit_kind(turns(pair, "a small red circle"), "a large red circle") == "size/1"  # the latest image
    assert _edit_kind([], "a small red circle") == "unknown"


def test_evaluate_keeps_the_eval_json_fields(eval_dir, tmp_path, tiny_generator):
    result = evaluate(tiny_generator, eval_dir, limit=2, progress=False, output_dir=tmp_path / "eval")
    assert set(result) == {"caption_attribute_accuracy", "describe_colour_accuracy", "drawing_accuracy",
                           "num_eval_examples", "drawing_by_kind", "edits_by_kind", "describe_failures",
                           "draw_failures"}
    assert result["num_eval_examples"] == {"describe": 2, "draw": 2}
    assert (tmp_path / "eval" / "toy" / "predictions.jsonl").is_file()
    assert (tmp_path / "eval" / "report.html").is_file()


def test_the_harness_does_not_import_the_toy_world():
    """textbind.eval names the toy benchmark by module path only (imported when `toy` runs)."""
    offenders = []
    for package in ("eval",):
        for path in (REPO / "textbind" / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path}: {name}" for name in names
                              if name.startswith(("textbind.toy", "textbind.testing"))]
    assert offenders == []
