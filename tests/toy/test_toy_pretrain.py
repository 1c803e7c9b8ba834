"""The toy pretraining: labels, what it writes back, and that the vision part learns to see and the
language part learns the toy world's language."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from textbind import SPECIAL_TOKENS
from textbind.config import ModelConfig
from textbind.data.sequence import ConversationEncoder
from textbind.model.builder import build_model, load_qformer, load_tokenizer
from textbind.tiny import TinySizes, build_tiny_pretrained
from textbind.toy.datagen import stream_rng
from textbind.toy.pretrain import (
    LANGUAGE_CHECK_STREAM,
    LANGUAGE_MIXTURE,
    LANGUAGE_REPORT_FILE,
    REPORT_FILE,
    TARGETS,
    main,
    pretrain_language,
    pretrain_vision,
    scene_labels,
    text_accuracy,
    text_batch,
)
from textbind.toy.world import COLOURS, LAYOUTS, SHAPES, SIZES, Scene, ShapeObject

SMALL = TinySizes(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, qformer_hidden=32,
                  qformer_layers=1, num_query_tokens=4, llm_hidden=32, llm_layers=1, llm_intermediate=64,
                  blip2_initializer_range=0.1, qformer_dropout=0.0, vision_position_sincos=2.0)


@pytest.fixture()
def small_model_dir(tmp_path):
    build_tiny_pretrained(tmp_path / "model", seed=0, sizes=SMALL)
    return tmp_path / "model"


def _model_paths(model_dir) -> dict[str, str]:
    return {
        "vision_model": str(model_dir / "blip2_vision_model"),
        "qformer": str(model_dir / "blip2_qformer.safetensors"),
        "language_model": str(model_dir / "llama"),
        "processor": str(model_dir / "processor"),
    }


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
    paths = _model_paths(small_model_dir)
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


def _check_accuracy(model_dir, model) -> dict[str, float]:
    """`pretrain_language`'s check set (seed 0, 40 conversations) scored for ``model``."""
    encoder = ConversationEncoder(load_tokenizer(str(model_dir / "llama")), num_query_tokens=1, template="llama2")
    ids, targets = text_batch(stream_rng(0, LANGUAGE_CHECK_STREAM), 40, encoder, LANGUAGE_MIXTURE)
    return text_accuracy(model, ids, targets, encoder.start_token_id, encoder.end_token_id)


def test_language_pretraining_learns_and_keeps_the_layout(small_model_dir):
    paths = _model_paths(small_model_dir)
    before = build_model(ModelConfig(**paths))
    untrained = _check_accuracy(small_model_dir, before.model.language_model)

    report = pretrain_language(small_model_dir, steps=60, batch_size=8, lr=5e-3, check_conversations=40,
                               progress=False)

    assert json.loads((small_model_dir / LANGUAGE_REPORT_FILE).read_text()) == report
    after = build_model(ModelConfig(**paths))
    trained = _check_accuracy(small_model_dir, after.model.language_model)
    assert trained == report["check_accuracy"]
    # Measured: 0.0 -> 0.61 of the assistant's tokens after 60 steps of 8 conversations.
    assert untrained["tokens"] < 0.2 and trained["tokens"] >= 0.4, (untrained, trained)
    # The special tokens are saved with the model: the builder adds nothing, and their ids stay put.
    tokenizer = load_tokenizer(paths["language_model"])
    assert len(tokenizer) == after.model.language_model.get_input_embeddings().weight.shape[0]
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == [
        before.tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    for name in ("vision_model", "qformer"):  # the vision part is not touched
        old, new = getattr(before.model, name).state_dict(), getattr(after.model, name).state_dict()
        assert all(torch.equal(old[key], new[key]) for key in old), name
    assert not list(small_model_dir.glob("*.new"))


def test_language_pretraining_refuses_a_directory_without_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="llama"):
        pretrain_language(tmp_path, steps=1, progress=False)


def test_both_parts_in_two_processes_write_both_reports(small_model_dir, capsys):
    main(["--model-dir", str(small_model_dir), "--steps", "2", "--language-steps", "2", "--batch-size", "4"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["vision"] == json.loads((small_model_dir / REPORT_FILE).read_text())["check_accuracy"]
    assert printed["language"] == json.loads((small_model_dir / LANGUAGE_REPORT_FILE).read_text())["check_accuracy"]


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="needs two cores to hand one over")
def test_the_part_that_finishes_first_leaves_its_threads_to_the_other(small_model_dir):
    threads_before = torch.get_num_threads()
    # One vision step against many language steps: the language part ends on both halves of the threads.
    main(["--model-dir", str(small_model_dir), "--steps", "1", "--language-steps", "150", "--batch-size", "4"])
    language = json.loads((small_model_dir / LANGUAGE_REPORT_FILE).read_text())
    assert language["threads_at_end"] == 2 * json.loads((small_model_dir / REPORT_FILE).read_text())["threads_at_end"]
    assert torch.get_num_threads() == threads_before  # the test process gets its threads back
