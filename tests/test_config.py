"""Run configs: YAML with includes, key=value overrides, validation, every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from textbind.config import ConfigError, load_config, save_config

CONFIGS = sorted(str(p) for p in Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_loads(path):
    if "/datagen/" in path:  # the data engine's configs have their own sections
        from textbind.datagen.config import DatagenConfig

        load_config(path, config_type=DatagenConfig)
    else:
        load_config(path)


def test_overrides_and_types(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  dtype: bfloat16\noptim:\n  lr: 1.0e-4\n")
    run = tmp_path / "run.yaml"
    run.write_text("include: [base.yaml]\ntrain:\n  micro_batch_size: 4\n")
    config = load_config(run, ["optim.lr=2e-5", "model.trainable=qformer,language_model",
                               "train.tensorboard=false", "optim.betas=[0.9,0.99]"])
    assert config.model.dtype == "bfloat16" and config.train.micro_batch_size == 4
    assert config.optim.lr == 2e-5 and config.optim.betas == (0.9, 0.99)
    assert config.model.trainable == ["qformer", "language_model"] and config.train.tensorboard is False
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("override,message", [
    ("optim.learning_rate=1", "unknown config key optim.learning_rate"),
    ("train.micro_batch_size=1.5", "expected an integer"),
    ("model.trainable=[lm]", "unknown module"),
    ("data.stage=3", "data.stage must be 1 or 2"),
    ("nodot", "not of the form"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be at least 1"),
    ("train.save_every=-5", "train.save_every must be 0 or more"),
    ("train.log_every=0", "train.log_every must be at least 1"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
