"""textbind as an lmms-eval model: the adapter (always), and the plugin through lmms-eval's own API (if installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from textbind.data.conversation import DataError, Turn
from textbind.eval.lmms import LmmsAnswerer, conversation_from_request, cut_at_stop, generation_config_for
from textbind.generation import DecodingConfig

REPO = Path(__file__).resolve().parents[2]


def test_requests_become_conversations(image_dir):
    red = Image.open(image_dir / "0.png")
    conversation = conversation_from_request("What is this?", [red, str(image_dir / "1.png")], "mme_test_3")
    turn = conversation.turns[0]
    assert turn.role == "user" and turn.content == "<image> <image>\nWhat is this?"
    assert isinstance(turn.image_list[0], Image.Image) and turn.image_list[1] == str(image_dir / "1.png")
    kept = conversation_from_request("Compare <image> with this.", [red], "x").turns[0]
    assert kept.content == "Compare <image> with this."
    assert conversation_from_request("Just text", None, "x").turns[0].image_list == []
    with pytest.raises(DataError, match="2 <image> marker"):
        conversation_from_request("<image> and <image>", [red], "item 7")
    with pytest.raises(DataError, match="not an image"):
        conversation_from_request("Watch", [{"video": "clip.mp4"}], "item 8")


def test_generation_kwargs_and_stop_strings():
    base = DecodingConfig(max_new_tokens=64, seed=3)
    greedy = generation_config_for(base, {"max_new_tokens": 16, "temperature": 0, "do_sample": False})
    assert greedy.max_new_tokens == 16 and not greedy.do_sample and greedy.seed == 3
    sampled = generation_config_for(base, {"temperature": 0.7, "do_sample": True, "top_p": 0.9})
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9
    assert generation_config_for(base, None) == base
    assert cut_at_stop("Yes.\n\nQuestion: next", ["\n\n"]) == "Yes."
    assert cut_at_stop("A dog", "Q:") == "A dog"


def test_answers_text_or_text_with_images(tmp_path, scripted, tiny_generator, image_dir):
    drawn = Image.new("RGB", (16, 16), (0, 200, 0))
    drawer = scripted(lambda c: Turn("assistant", "Here it is: <image> Nice?", [drawn], ["a green square"]))
    answer = LmmsAnswerer(drawer, DecodingConfig(), tmp_path / "images").answer(
        "Draw a green square.", [], {"until": ["\n\n"]}, "gen_test_0")
    parsed = json.loads(answer)
    assert parsed["text"] == "Here it is: Nice?" and parsed["captions"] == ["a green square"]
    assert [Image.open(path).size for path in parsed["images"]] == [(16, 16)]
    text = LmmsAnswerer(tiny_generator, DecodingConfig(max_new_tokens=5), tmp_path).answer(
        "What is this?", [Image.open(image_dir / "2.png")], {"max_new_tokens": 4, "temperature": 0}, "mme_0")
    assert isinstance(text, str) and not text.startswith("{")


def test_plugin_through_lmms_eval_model_api(tiny_paths, tmp_path, image_dir):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    model_class = get_model("textbind")  # found through the `lmms_eval.models` entry point
    assert issubclass(model_class, lmms) and model_class.is_simple
    arguments = ",".join(f"{key}={value}" for key, value in tiny_paths.items())
    model = model_class.create_from_arg_string(
        f"config={REPO / 'configs/model/tiny.yaml'},{arguments},checkpoint=,image_decoder=toy,device=cpu,"
        f"max_new_tokens=6,output_dir={tmp_path / 'images'}", {"batch_size": 1})
    documents = {0: {"image": Image.open(image_dir / "0.png")}, 1: {"image": Image.open(image_dir / "1.png")}}
    model.task_dict = {"toy_task": {"test": documents}}
    requests = [
        Instance("generate_until", (f"<image>\nQuestion {doc_id}?", {"max_new_tokens": 5, "until": ["\n\n"]},
                                    lambda document: [document["image"]], doc_id, "toy_task", "test"),
                 idx=0, metadata={"task": "toy_task", "doc_id": doc_id, "repeats": 1})
        for doc_id in documents
    ]
    answers = model.generate_until(requests)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    for answer in answers:
        if answer.startswith("{"):
            assert set(json.loads(answer)) >= {"text", "images"}
    with pytest.raises(NotImplementedError):
        model.loglikelihood(requests)
