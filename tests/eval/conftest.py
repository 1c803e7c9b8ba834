"""Fixtures of the evaluation tests: tiny CLIP / BERT models, a tiny generator, a scripted answerer."""

from __future__ import annotations

import pytest

from textbind.data.conversation import Turn
from textbind.generation import FINISH_STOP, DoneEvent


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    from textbind.testing.tiny_metrics import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from textbind.testing.tiny_metrics import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def tiny_generator(model_config):
    from textbind.runtime import DecoderKind, GeneratorSetup, build_generator

    return build_generator(GeneratorSetup(model=model_config, device="cpu", image_decoder=DecoderKind.TOY))


class ScriptedAnswerer:
    """Answers from a function of the conversation (the model's stand-in where the scorer is under test)."""

    def __init__(self, answer):
        self.answer = answer  # conversation -> Turn or str
        self.calls = 0

    def generate(self, conversation, config=None):
        self.calls += 1
        answer = self.answer(conversation)
        turn = answer if isinstance(answer, Turn) else Turn("assistant", answer)
        return DoneEvent(turn, FINISH_STOP, [])

    def generate_turn(self, conversation, config=None):
        return self.generate(conversation, config).turn


@pytest.fixture
def scripted():
    return ScriptedAnswerer
