"""LoRA on the language model: it trains, the merged export gives the adapted model's logits, quantizing needs a GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from textbind.checkpoint import ADAPTER_DIR, save_trained_modules
from textbind.config import ConfigError, LoraConfig, load_config
from textbind.data.collate import collate
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.loss import compute_loss
from textbind.model.builder import build_model
from textbind.model.lora import has_lora

from helpers import one_output_image

TRAINABLE = ["query_tokens", "qformer", "qformer_projection", "language_model"]
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def batch_of(bundle, image_dir):
    encoder = ConversationEncoder(bundle.tokenizer, bundle.model.num_query_tokens, max_length=256)
    return collate([prepare_sample(one_output_image(image_dir), encoder, bundle.image_processor)],
                   bundle.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def trained(model_config, image_dir):
    torch.manual_seed(0)
    bundle = build_model(replace(model_config, trainable=TRAINABLE), lora=LORA)
    frozen_before = {name: p.detach().clone() for name, p in bundle.model.language_model.named_parameters()
                     if "lora_" not in name}
    batch = batch_of(bundle, image_dir)
    optimizer = torch.optim.Adam([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-2)
    bundle.model.train()
    losses = []
    for _ in range(20):
        loss = compute_loss(bundle.model, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    bundle.model.eval()
    return bundle, batch, losses, frozen_before


def test_lora_trains_adapters_and_leaves_the_base_weights(trained):
    bundle, _, losses, frozen_before = trained
    assert has_lora(bundle.model.language_model)
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < min(losses[:10]), losses
    for name, parameter in bundle.model.language_model.named_parameters():
        if "lora_" in name:
            assert parameter.requires_grad
        else:
            assert not parameter.requires_grad and torch.equal(parameter, frozen_before[name]), name
    assert bundle.model.qformer_projection.weight.requires_grad  # the projector still trains fully


def test_merged_export_gives_the_adapted_logits(trained, model_config, tmp_path):
    bundle, batch, _, _ = trained
    config = load_config(None, ["train.lora.enabled=true", "train.lora.save_adapter=true"])
    export = save_trained_modules(bundle.model, tmp_path / "export", config, module_names=TRAINABLE)
    assert (export / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (export / ADAPTER_DIR / "adapter_config.json").is_file()
    plain = build_model(replace(model_config, checkpoint=str(export), trainable=[]))
    plain.model.eval()
    assert not has_lora(plain.model.language_model)
    with torch.no_grad():
        adapted = compute_loss(bundle.model, batch, return_logits=True)
        merged = compute_loss(plain.model, batch, return_logits=True)
    torch.testing.assert_close(merged.logits, adapted.logits, rtol=1e-4, atol=1e-4)
    assert float(merged.loss) == pytest.approx(float(adapted.loss), rel=1e-5)


def test_quantizing_needs_a_gpu(model_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="CUDA"):
        build_model(replace(model_config, quantize="4bit"))
    with pytest.raises(ConfigError, match="lora"):
        load_config(None, ["train.quantize=4bit"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_step_on_the_gpu(model_config, image_dir, bits):
    pytest.importorskip("bitsandbytes")
    bundle = build_model(replace(model_config, trainable=TRAINABLE, dtype="bfloat16"), lora=LORA, quantize=bits)
    batch = batch_of(bundle, image_dir)
    loss = compute_loss(bundle.model, batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for n, p in bundle.model.language_model.named_parameters() if "lora_" in n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_inference_on_the_gpu(model_config, image_dir, bits):
    """model.quantize: the generator (inference, demo, server, evaluation) runs a 4- or 8-bit language model."""
    pytest.importorskip("bitsandbytes")
    from textbind.runtime import GeneratorSetup, build_generator

    generator = build_generator(GeneratorSetup(model=replace(model_config, quantize=bits, dtype="bfloat16"),
                                               device="cuda"))
    conversation = one_output_image(image_dir)
    conversation.turns = conversation.turns[:1]
    done = generator.generate(conversation)
    assert done.token_ids and done.finish_reason in ("stop", "length", "image_limit")
