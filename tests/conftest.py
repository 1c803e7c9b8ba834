"""Shared fixtures: a tiny offline pretrained set, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread; more only contend for this machine's two cores.
torch.set_num_threads(1)

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (150, 40, 180), (250, 140, 0)]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from textbind.tiny import build_tiny_pretrained

    return build_tiny_pretrained(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def model_config(tiny_paths):
    from textbind.config import ModelConfig

    return ModelConfig(**tiny_paths)


@pytest.fixture(scope="session")
def bundle(model_config):
    from textbind.model.builder import build_model

    torch.manual_seed(0)
    built = build_model(model_config)
    built.model.eval()  # the Q-Former has dropout: equivalence tests need eval mode
    return built


@pytest.fixture(scope="session")
def bundle_of_style(model_config, tmp_path_factory):
    """style -> a tiny bundle in eval mode: llama2 is built as `bundle` is; llama3 and qwen2 (textbind.tiny.CHAT_STYLES)
    use their tokenizer's chat template (model.template=chat_template). Each is built once per session."""
    from textbind.config import ModelConfig
    from textbind.model.builder import build_model
    from textbind.tiny import build_tiny_pretrained

    built = {}

    def get(style: str):
        if style not in built:
            if style == "llama2":
                config = model_config
            else:
                paths = build_tiny_pretrained(tmp_path_factory.mktemp(f"tiny-{style}"), seed=0, style=style)
                config = ModelConfig(**paths, template="chat_template")
            torch.manual_seed(0)
            built[style] = build_model(config)
            built[style].model.eval()
        return built[style]

    return get


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Six small images of distinct colours with a shape each, named 0.png .. 5.png."""
    directory = tmp_path_factory.mktemp("images")
    for index, colour in enumerate(COLOURS):
        image = Image.new("RGB", (48, 48), (255, 255, 255))
        image.paste(colour, (8 + index, 8, 30 + index, 40))
        image.save(directory / f"{index}.png")
    return directory
