"""Export to a stock transformers Blip2 directory: same logits there, same model when textbind loads it back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from textbind.config import ModelConfig, RunConfig
from textbind.data.collate import collate
from textbind.data.samples import pixel_values_for, prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.export_hf import export
from textbind.generation import DecodingConfig, InterleavedGenerator
from textbind.loss import compute_loss
from textbind.model.builder import build_model

from helpers import conversation, several_output_images

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def prompt(image_dir):
    """A system turn, user images before, inside and after text, an assistant image in the history."""
    return conversation(
        ("system", "You draw things."),
        ("user", "<image> What is this? Compare it with <image>", ["0.png", "1.png"]),
        ("assistant", "A red block. Here is a green one: <image> Do you like it?", ["2.png"], ["a green block"]),
        ("user", "Now this one. <image>", ["3.png"]),
        image_dir=image_dir,
    )


def messages(image_dir):
    """The same conversation as chat messages (string and list contents), with its images in order."""
    files = [Image.open(image_dir / f"{index}.png") for index in range(4)]
    return [
        {"role": "system", "content": "You draw things."},
        {"role": "user", "content": "<image> What is this? Compare it with <image>"},
        {"role": "assistant", "content": "A red block. Here is a green one: <image> Do you like it?"},
        {"role": "user", "content": [{"type": "text", "text": "Now this one."}, {"type": "image"}]},
    ], files


@pytest.fixture(scope="module")
def exported(bundle, model_config, tmp_path_factory):
    # A small shard size: the export must hold several shards, as a 7B one does.
    return export(bundle, model_config, tmp_path_factory.mktemp("export") / "textbind-tiny", max_shard_size="100KB")


@pytest.fixture(scope="module")
def stock(exported):
    return Blip2ForConditionalGeneration.from_pretrained(str(exported), dtype=torch.float32).eval()


def test_stock_transformers_gives_the_same_logits(bundle, exported, stock, image_dir):
    encoded, pixel_values = prepare_sample(
        prompt(image_dir), ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens), bundle.image_processor,
        for_inference=True)
    input_ids = torch.tensor([encoded.input_ids])
    assert len(encoded.images) == 4
    with torch.no_grad():
        ours = bundle.model(input_ids=input_ids, pixel_values=pixel_values).logits
        theirs = stock(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids)).logits
    torch.testing.assert_close(theirs, ours, **TOLERANCE)
    # the images matter: other pixels change the logits (a blind model would hide misplaced images)
    with torch.no_grad():
        other = stock(input_ids=input_ids, pixel_values=pixel_values.flip(0)).logits
    assert (other - ours).abs().max() > 1e-3


def test_every_weight_is_exported_under_its_stock_name(bundle, exported, stock):
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    ours = bundle.model.state_dict()
    theirs = stock.state_dict()
    renamed = {key.replace("qformer_projection.", "language_projection.", 1): value for key, value in ours.items()}
    assert set(renamed) == set(theirs)
    assert any(key.startswith("vision_model.") for key in index["weight_map"])
    for key, value in renamed.items():
        assert torch.equal(theirs[key], value), key
    config = json.loads((exported / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama"
    assert config["num_query_tokens"] == bundle.model.num_query_tokens
    image_token_id = bundle.tokenizer.convert_tokens_to_ids("<image>")
    assert config["image_token_index"] == stock.config.image_token_id == image_token_id


def test_stock_processor_and_chat_template_build_textbinds_inputs(bundle, exported, image_dir):
    processor = AutoProcessor.from_pretrained(str(exported))
    chat, images = messages(image_dir)
    text = processor.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=images, text=text, add_special_tokens=False, return_tensors="pt")
    encoded, pixel_values = prepare_sample(
        prompt(image_dir), ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens), bundle.image_processor,
        for_inference=True)
    assert inputs["input_ids"][0].tolist() == encoded.input_ids
    torch.testing.assert_close(inputs["pixel_values"], pixel_values)
    for token in ("<image>", "<start>", "<end>"):
        assert processor.tokenizer.convert_tokens_to_ids(token) == bundle.tokenizer.convert_tokens_to_ids(token)
    with pytest.raises(Exception, match="alternate"):
        processor.tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi."}], tokenize=False)


def test_textbind_loads_the_directory_back(bundle, exported, image_dir):
    loaded = build_model(ModelConfig(pretrained=str(exported)))
    loaded.model.eval()
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=768)
    # a training sample with caption branches: the training path sees the same model
    batch = collate([prepare_sample(several_output_images(image_dir), encoder, bundle.image_processor)],
                    bundle.tokenizer.pad_token_id)
    with torch.no_grad():
        expected = compute_loss(bundle.model, batch, return_logits=True)
        actual = compute_loss(loaded.model, batch, return_logits=True)
    torch.testing.assert_close(actual.logits, expected.logits, **TOLERANCE)
    torch.testing.assert_close(actual.loss, expected.loss, **TOLERANCE)
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert loaded.tokenizer.padding_side == "right"  # textbind's own padding, whatever the export says
    pixels = pixel_values_for([image_dir / "0.png"], loaded.image_processor, "test")
    torch.testing.assert_close(pixels, pixel_values_for([image_dir / "0.png"], bundle.image_processor, "test"))

    # inference: the same greedy answer, control tokens included
    config = DecodingConfig(max_new_tokens=12)
    expected_done = InterleavedGenerator.from_bundle(bundle).generate(prompt(image_dir), config)
    actual_done = InterleavedGenerator.from_bundle(loaded).generate(prompt(image_dir), config)
    assert actual_done.token_ids == expected_done.token_ids and len(actual_done.token_ids) == 12

    # further training: the loaded model trains (every module it is told to)
    trainable = build_model(ModelConfig(pretrained=str(exported), trainable=["qformer", "qformer_projection"]))
    loss = compute_loss(trainable.model, batch).loss
    loss.backward()
    assert trainable.model.qformer_projection.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in trainable.model.language_model.parameters())


def test_hub_ids_and_missing_paths(tiny_paths):
    with pytest.raises(FileNotFoundError, match="model.pretrained: nobody/no-such-textbind-model is no local path"):
        build_model(ModelConfig(pretrained="nobody/no-such-textbind-model"))  # HF_HUB_OFFLINE=1 in conftest
    with pytest.raises(FileNotFoundError, match="model.pretrained: ./no/such/dir does not exist"):
        build_model(ModelConfig(pretrained="./no/such/dir"))
    with pytest.raises(FileNotFoundError, match="model.language_model: nobody/no-such-llama is no local path"):
        build_model(replace(ModelConfig(**tiny_paths), language_model="nobody/no-such-llama"))


def test_export_command_writes_a_model_card(tiny_paths, bundle, tmp_path):
    from textbind.checkpoint import save_trained_modules
    from textbind.export_hf import main

    run = tmp_path / "run"
    config = RunConfig()
    config.optim.lr = 3.5e-5
    config.data.stage = 2
    config.data.train_path = "data/textbind/train.json"
    save_trained_modules(bundle.model, run / "model", config, ["qformer_projection"], extra_info={"steps": 123})
    (run / "eval.json").write_text(json.dumps({"bleu_2": 0.4321, "nested": {"clip_score": 27.5}, "note": "x"}))
    paths = [f"--{key.replace('_', '-')}={value}" for key, value in tiny_paths.items()]
    out = tmp_path / "exported"
    assert main([*paths, "--checkpoint", str(run / "model"), "--out", str(out), "--license", "cc-by-nc-4.0"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: cc-by-nc-4.0" in card
    for fact in ("learning rate: 3.5e-05", "training data: data/textbind/train.json", "steps: 123",
                 "| bleu_2 | 0.4321 |", "| nested.clip_score | 27.5 |", "eval.json", "CC BY-NC 4.0",
                 "Blip2ForConditionalGeneration.from_pretrained"):
        assert fact in card, fact
    assert main([*paths, "--out", str(tmp_path / "bad"), "--eval-report", str(tmp_path / "none.json")]) == 2
    assert not (tmp_path / "bad").exists()


def test_push_to_hub_goes_through_the_hub_library(tiny_paths, tmp_path, capsys, monkeypatch):
    """Offline, the push reaches huggingface_hub and fails there with a clear message; the directory stays."""
    from textbind.export_hf import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = [f"--{key.replace('_', '-')}={value}" for key, value in tiny_paths.items()]
    out = tmp_path / "pushed"
    assert main([*paths, "--out", str(out), "--push-to-hub", "someone/textbind-tiny"]) == 1
    assert "pushing" in capsys.readouterr().err and (out / "config.json").is_file()
