"""Conversation markups as a config choice: Llama-2 chat, or the tokenizer's own chat template (Llama-3, Qwen2)."""

from __future__ import annotations

import pytest
import torch

from textbind.config import ConfigError, ModelConfig, load_config
from textbind.data.sequence import ConversationEncoder
from textbind.generation import DecodingConfig, InterleavedGenerator
from textbind.model.builder import build_model

from helpers import conversation


def test_template_is_validated(model_config):
    assert load_config(None, ["model.template=chat_template"]).model.template == "chat_template"
    with pytest.raises(ConfigError, match="model.template"):
        load_config(None, ["model.template=mistral"])
    # the tiny Llama-2 tokenizer has no chat template of its own
    with pytest.raises(ValueError, match="no chat template"):
        build_model(ModelConfig(**{**model_config.__dict__, "template": "chat_template"}))


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_generation_with_a_chat_template(bundle_of_style, image_dir, style):
    """The generator prompts with the template's generation prompt and decodes as with Llama-2 markup: the same
    greedy tokens as a step-by-step argmax over the plain forward pass (no image written: <start> is masked)."""
    bundle = bundle_of_style(style)
    prompt = conversation(("user", "What is this? <image>", ["0.png"]), image_dir=image_dir)
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens)
    assert encoder.template == "chat_template"
    done = InterleavedGenerator.from_bundle(bundle).generate(prompt, DecodingConfig(max_new_tokens=6, max_images=0))

    from textbind.data.samples import prepare_sample

    encoded, pixel_values = prepare_sample(prompt, encoder, bundle.image_processor, for_inference=True)
    ids = list(encoded.input_ids)
    control = [bundle.tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<start>", "<end>")]
    expected = []
    with torch.no_grad():
        for _ in range(len(done.token_ids)):
            logits = bundle.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0, -1]
            logits[control] = float("-inf")
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
            if expected[-1] == bundle.tokenizer.eos_token_id:
                break
    assert done.token_ids == expected


def test_a_qwen2_model_exports_to_stock_transformers(bundle_of_style, image_dir, tmp_path):
    """A Qwen2 text model exports as well: the same logits in stock Blip2ForConditionalGeneration, its own template."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    from textbind.data.samples import prepare_sample
    from textbind.export_hf import export

    bundle = bundle_of_style("qwen2")
    out = export(bundle, ModelConfig(template="chat_template"), tmp_path / "qwen2-export")
    stock = Blip2ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(stock.language_model).__name__ == "Qwen2ForCausalLM"
    prompt = conversation(("user", "What is this? <image> And <image>", ["0.png", "1.png"]), image_dir=image_dir)
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens)
    encoded, pixel_values = prepare_sample(prompt, encoder, bundle.image_processor, for_inference=True)
    input_ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        ours = bundle.model(input_ids=input_ids, pixel_values=pixel_values).logits
        theirs = stock(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == bundle.tokenizer.chat_template
    loaded = build_model(ModelConfig(pretrained=str(out), template="chat_template"))
    assert ConversationEncoder(loaded.tokenizer, 32).encode(prompt, for_inference=True).input_ids == encoded.input_ids
