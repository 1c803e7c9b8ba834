"""The toy vision pretraining: labels, what it writes back, and that it learns to see."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from textbind.config import ModelConfig
from textbind.model.builder import build_model, load_qformer
from textbind.tiny import TinySizes, build_tiny_pretrained
from textbind.toy.pretrain import REPORT_FILE, TARGETS, pretrain_vision, scene_labels
from textbind.toy.world import COLOURS, LAYOUTS, SHAPES, SIZES, Scene, ShapeObject

SMALL = TinySizes(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, qformer_hidden=32,
                  qformer_layers=1, num_query_tokens=4, llm_hidden=32, llm_layers=1, llm_intermediate=64,
                  blip2_initializer_range=0.1, qformer_dropout=0.0, vision_position_sincos=2.0)


@pytest.fixture()
def small_model_dir(tmp_path):
    build_tiny_pretrained(tmp_path / "model", seed=0, sizes=SMALL)
    return tmp_path / "model"


def test_scene_labels_index_every_target():
    red_circle = ShapeObject(colour="red", shape="circle", size="small")
    blue_square = ShapeObject(colour="blue", shape="square", size="large")
    pair = scene_labels(Scene(objects=(red_circle, blue_square), layout="vertical"))
    assert pair == [LAYOUTS.index("vertical"), list(COLOURS).index("red"), SHAPES.index("circle"),
                    SIZES.index("small"), list(COLOURS).index("blue"), SHAPES.index("square"), SIZES.index("large")]
    single = scene_labels(Scene(objects=(blue_square,), layout="single"))
    # The absent second object takes each attribute's extra last class.
    assert single[4:] == [len(COLOURS), len(SHAPES), len(SIZES)]
    assert all(0 <= label < classes for label, (_, classes) in zip(single, TARGETS, strict=True))


def test_pretraining_learns_and_writes_the_blip2_layout_back(small_model_dir):
    paths = {
        "vision_model": str(small_model_dir / "blip2_vision_model"),
        "qformer": str(small_model_dir / "blip2_qformer.safetensors"),
        "language_model": str(small_model_dir / "llama"),
        "processor": str(small_model_dir / "processor"),
    }
    before_qformer, before_queries = load_qformer(paths["qformer"])
    before = build_model(ModelConfig(**paths)).model

    report = pretrain_vision(small_model_dir, steps=200, batch_size=32, lr=3e-3, check_images=300, progress=False)

    assert json.loads((small_model_dir / REPORT_FILE).read_text()) == report
    accuracy = report["check_accuracy"]
    # Chance is 1/3 for the layout and 1/6 for the first object's colour; these are learned first
    # (measured after 200 steps: 0.86 and 0.74).
    assert accuracy["layout"] >= 0.7, accuracy
    assert accuracy["colour_1"] >= 0.5, accuracy
    # What stage 1 loads: the same architecture and tokenizer, new vision and Q-Former weights.
    after = build_model(ModelConfig(**paths)).model
    for name in ("vision_model", "qformer"):
        old, new = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert old.keys() == new.keys()
        assert any(not torch.equal(old[key], new[key]) for key in old), name
    assert not torch.equal(before.query_tokens, after.query_tokens)
    assert before.query_tokens.shape == before_queries.shape == after.query_tokens.shape
    assert after.qformer.config.to_diff_dict() == before_qformer.config.to_diff_dict()
    for old, new in zip(before.language_model.parameters(), after.language_model.parameters(), strict=True):
        assert torch.equal(old, new)  # the language model is not touched
    assert not list(small_model_dir.glob("*.new"))


def test_pretraining_refuses_a_directory_without_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="blip2_vision_model"):
        pretrain_vision(tmp_path, steps=1, progress=False)


def test_pretraining_is_deterministic(tmp_path):
    reports = []
    for name in ("a", "b"):
        build_tiny_pretrained(tmp_path / name, seed=0, sizes=replace(SMALL, vision_layers=1))
        reports.append(pretrain_vision(tmp_path / name, steps=3, check_images=20, progress=False))
        reports[-1].pop("seconds")
    assert reports[0] == reports[1]
    first, second = (load_qformer(str(tmp_path / name / "blip2_qformer.safetensors"))[1] for name in ("a", "b"))
    assert torch.equal(first, second)
