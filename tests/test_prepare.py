"""The tiny pretrained set and the BLIP-2 splitting command (original README section 2.2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2VisionModel

from textbind.prepare_blip2 import main as prepare_main
from textbind.tiny import TinySizes, build_tiny_pretrained


def test_tiny_set_is_deterministic(tmp_path):
    sizes = TinySizes(vision_layers=1, qformer_layers=1, llm_layers=1)
    first = build_tiny_pretrained(tmp_path / "a", seed=3, sizes=sizes)
    second = build_tiny_pretrained(tmp_path / "b", seed=3, sizes=sizes)
    for key in ("qformer",):
        a, b = load_file(first[key]), load_file(second[key])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(f"{first['language_model']}/model.safetensors")
    b = load_file(f"{second['language_model']}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/llama/tokenizer.json").read_text() == (tmp_path / "b/llama/tokenizer.json").read_text()
    other = build_tiny_pretrained(tmp_path / "c", seed=4, sizes=sizes)
    c = load_file(f"{other['language_model']}/model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_prepare_blip2_splits_a_checkpoint(tmp_path, capsys):
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, initializer_range=0.02),
        qformer_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            encoder_hidden_size=16, cross_attention_frequency=2),
        text_config=dict(model_type="opt", hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
                         vocab_size=32, word_embed_proj_dim=8),
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration(config)
    blip2.save_pretrained(tmp_path / "blip2")
    prepare_main(["--blip2", str(tmp_path / "blip2"), "--out", str(tmp_path / "out")])
    assert "blip2_qformer.safetensors" in capsys.readouterr().out

    vision = Blip2VisionModel.from_pretrained(tmp_path / "out/blip2_vision_model")
    for key, value in vision.state_dict().items():
        assert torch.equal(value, blip2.vision_model.state_dict()[key]), key
    tensors = load_file(tmp_path / "out/blip2_qformer.safetensors")
    assert torch.equal(tensors["query_tokens"], blip2.query_tokens.detach())
    assert not any(k.startswith(("language_model", "vision_model")) for k in tensors)
    for key, value in blip2.qformer.state_dict().items():
        assert torch.equal(tensors[f"qformer.{key}"], value), key
    with safe_open(str(tmp_path / "out/blip2_qformer.safetensors"), "pt") as handle:
        recorded = json.loads(handle.metadata()["qformer_config"])
    assert recorded["cross_attention_frequency"] == 2 and recorded["encoder_hidden_size"] == 16


def test_legacy_qformer_file_config_is_inferred(tiny_paths, tmp_path, image_dir):
    """The original README's blip2_qformer.pt (no config inside) builds the same model."""
    from dataclasses import replace

    from textbind.config import ModelConfig
    from textbind.model.builder import build_model

    torch.save(load_file(tiny_paths["qformer"]), tmp_path / "blip2_qformer.pt")
    config = ModelConfig(**tiny_paths)
    torch.manual_seed(0)
    new = build_model(config).model.eval()
    torch.manual_seed(0)
    legacy_config = replace(config, qformer=str(tmp_path / "blip2_qformer.pt"), qformer_num_heads=4)
    legacy = build_model(legacy_config).model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(new.encode_images(pixels), legacy.encode_images(pixels))


def test_missing_paths_are_named(tiny_paths):
    from textbind.config import ModelConfig
    from textbind.model.builder import build_model

    with pytest.raises(FileNotFoundError, match="model.language_model: /nowhere/llama does not exist"):
        build_model(ModelConfig(**{**tiny_paths, "language_model": "/nowhere/llama"}))
