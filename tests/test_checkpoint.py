"""Checkpoints: bit-exact safetensors round trip, original-release .pt import, no arbitrary unpickling."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from textbind.checkpoint import load_trained_modules, save_trained_modules, trained_state_dict
from textbind.config import RunConfig, load_config
from textbind.data.collate import collate
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.model.builder import build_model

from helpers import one_output_image


def perturb(model, modules, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.split(".")[0] in modules:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def logits_of(built, image_dir):
    encoder = ConversationEncoder(built.tokenizer, built.model.num_query_tokens)
    batch = collate([prepare_sample(one_output_image(image_dir), encoder, built.image_processor)],
                    built.tokenizer.pad_token_id)
    built.model.eval()
    with torch.no_grad():
        return built.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits


def test_round_trip_is_bit_exact(model_config, image_dir, tmp_path):
    modules = ["query_tokens", "qformer", "qformer_projection", "language_model"]
    trained = build_model(replace(model_config, trainable=modules))
    perturb(trained.model, modules)
    config = RunConfig(model=replace(model_config, trainable=modules))
    out = save_trained_modules(trained.model, tmp_path / "export", config)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "textbind.json"]
    assert load_config(out / "config.yaml").model.trainable == modules

    fresh = build_model(replace(model_config, checkpoint=str(out)))
    for key, value in trained_state_dict(trained.model, modules).items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    assert torch.equal(logits_of(fresh, image_dir), logits_of(trained, image_dir))
    # not loading it gives other logits: the check above can fail
    assert not torch.equal(logits_of(build_model(model_config), image_dir), logits_of(trained, image_dir))


def test_original_release_format_loads(model_config, image_dir, tmp_path):
    modules = ["query_tokens", "qformer", "qformer_projection", "language_model"]
    trained = build_model(replace(model_config, trainable=modules))
    perturb(trained.model, modules, seed=3)
    release = {k: v.clone() for k, v in trained.model.state_dict().items() if k.split(".")[0] in modules}
    assert any(k.startswith("language_model.model.layers.") for k in release)
    release["some_extra.weight"] = torch.zeros(2)
    torch.save(release, tmp_path / "second_stage_model.pt")

    fresh = build_model(model_config)
    report = load_trained_modules(fresh.model, tmp_path / "second_stage_model.pt")
    assert report.unexpected == ["some_extra.weight"]
    assert report.missing == []
    assert torch.equal(logits_of(fresh, image_dir), logits_of(trained, image_dir))

    # a partial file reports the keys of its modules that it lacks
    del release["qformer.layernorm.weight"]
    torch.save(release, tmp_path / "partial.pt")
    report = load_trained_modules(build_model(model_config).model, tmp_path / "partial.pt")
    assert report.missing == ["qformer.layernorm.weight"]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(bundle, tmp_path, capsys):
    file = tmp_path / "evil.pt"
    with open(file, "wb") as handle:
        pickle.dump({"qformer.x": Payload()}, handle)
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_trained_modules(bundle.model, file)
    assert "this must never run" not in capsys.readouterr().out


def test_shape_mismatch_names_the_tensor(bundle, tmp_path):
    torch.save({"qformer_projection.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="qformer_projection.weight has shape"):
        load_trained_modules(bundle.model, tmp_path / "bad.pt")
