"""Metric values against known values: maxima for identical inputs, hand-checked BLEU / ROUGE-L, CLIP, intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torchmetrics.text import SacreBLEUScore

from textbind.eval.config import EvalConfig
from textbind.eval.harness import write_report
from textbind.eval.metrics import (
    ClipSimilarity,
    bertscore_f1,
    bleu_statistics,
    bootstrap_interval,
    corpus_bleu,
    mean_interval,
    plain_text,
    presence_scores,
    rouge_l,
)
from textbind.eval.textbind_eval import TextBindEval

SENTENCES = ["the cat sat on the mat by the door", "a small red circle on the left and a blue square"]


def test_identical_texts_score_the_maximum(tiny_bert):
    assert corpus_bleu(SENTENCES, SENTENCES, 4) == pytest.approx(1.0)
    assert rouge_l(SENTENCES, SENTENCES) == pytest.approx([1.0, 1.0])
    assert bertscore_f1(SENTENCES, SENTENCES, tiny_bert) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_hand_checked_bleu_and_rouge():
    # 13a tokens: [the cat sat on the mat] vs [the cat is on the mat]; unigrams 5/6 match, bigrams 3/5
    # (the cat, on the, the mat), equal lengths (no brevity penalty): BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2).
    # No 4-gram matches: BLEU-4 = 0. LCS = the cat on the mat (5): ROUGE-L P = R = F = 5/6.
    prediction, reference = "The cat sat on the mat", "the cat is on the mat"
    assert corpus_bleu([prediction], [reference], 2) == pytest.approx(0.5 ** 0.5)
    assert corpus_bleu([prediction], [reference], 4) == 0.0
    assert rouge_l([prediction], [reference]) == pytest.approx([5 / 6])
    # Statistics: matched 5, 3; total 6, 5; lengths 6, 6.
    assert bleu_statistics([prediction], [reference], 2).tolist() == [[5, 3, 6, 5, 6, 6]]
    assert rouge_l([""], [reference]) == [0.0]  # no answer gets no credit


def test_corpus_bleu_equals_torchmetrics():
    predictions = ["the cat sat on the mat .", "A dog runs in the park, happily!", "hello there my good friend"]
    references = ["the cat is on the mat.", "a dog is running in the park", "hello there my friend"]
    for n_gram in (2, 4):
        metric = SacreBLEUScore(n_gram=n_gram, tokenize="13a", lowercase=True)
        metric.update(predictions, [[reference] for reference in references])
        assert corpus_bleu(predictions, references, n_gram) == pytest.approx(float(metric.compute()), abs=1e-6)


def test_clip_similarity_of_an_image_with_itself(tiny_clip):
    clip = ClipSimilarity(tiny_clip)
    red, blue = Image.new("RGB", (40, 40), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))
    same, different = clip.image_image([red, red], [red.copy(), blue])
    assert same == pytest.approx(100.0, abs=1e-3)
    assert different < same
    assert 0.0 <= clip.image_text([red], ["a red square"])[0] <= 100.0


def test_presence_and_intervals():
    assert presence_scores([True, True, False, False], [True, False, True, False]) == {
        "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert presence_scores([False], [False]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    values = [0.0, 1.0, 1.0, 0.5, 0.25, 0.75]
    interval = mean_interval(values, seed=3)
    assert interval == mean_interval(values, seed=3)  # seeded
    assert interval[0] <= np.mean(values) <= interval[1]
    rows = np.array(values)[:, None]
    low, high = bootstrap_interval(rows, lambda r: float(r.mean()), seed=3)
    assert low <= np.mean(values) <= high
    assert mean_interval([1.0]) is None


def test_textbind_scores_images_and_captions(tmp_path, tiny_clip):
    """Scoring of handmade predictions: the generated image is the reference image, the caption the same."""
    image = Image.new("RGB", (40, 40), (30, 200, 40))
    image.save(tmp_path / "reference.png")
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "generated.png")
    records = [
        {"id": "0:1", "error": None,
         "reference": {"record": 0, "turn": 1, "content": "Here: <image>", "images": [str(tmp_path / "reference.png")],
                       "captions": ["a green square"]},
         "prediction": {"content": "Here: <image>", "captions": ["a green square"],
                        "images": ["images/generated.png"]}},
        {"id": "1:1", "error": None,
         "reference": {"record": 1, "turn": 1, "content": "No image here.", "images": [], "captions": []},
         "prediction": {"content": "Here is one <image>", "captions": ["a cat"], "images": [None]}},
        {"id": "2", "error": "record 2: malformed", "reference": {"record": 2}},
    ]
    benchmark = TextBindEval(str(tmp_path / "unused.json"), EvalConfig(clip_model=tiny_clip))
    scores = benchmark.score(records, tmp_path)
    metrics = scores.metrics
    assert metrics["image_precision"].value == 0.5 and metrics["image_recall"].value == 1.0
    assert metrics["image_f1"].value == pytest.approx(2 / 3) and metrics["image_f1"].count == 3
    assert metrics["caption_rouge_l"].value == 1.0 and metrics["caption_rouge_l"].count == 1
    assert metrics["clip_image_image"].value == pytest.approx(100.0, abs=1e-3)
    assert metrics["clip_image_image"].count == 1 and metrics["clip_image_caption"].count == 1
    # Text: item 0 matches exactly (after markers are removed), the failed item counts as an empty answer.
    assert scores.item_scores["0:1"]["rouge_l"] == 1.0 and scores.item_scores["2"]["rouge_l"] == 0.0
    assert metrics["rouge_l"].count == 3
    assert plain_text("Here: <image>  more") == "Here: more"
    report = write_report(benchmark, records, tmp_path, {})
    assert json.loads((tmp_path / "report.json").read_text())["metrics"]["image_f1"]["count"] == 3
    assert report["num_failed"] == 1
