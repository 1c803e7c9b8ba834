"""Decoding speed: the KV cache against recomputing the prefix, and batched decoding against one request at a time.

    python benchmarks/generation.py [--device cuda] [--tokens 64] [--requests 16] [--threads 1]
    python benchmarks/generation.py --real-shapes --device cuda   # random weights at Llama-2-7B shapes (a GPU)

Part 1 times one answer with the KV-cache generator and with a full forward over the growing
sequence per token. Part 2 decodes the same `--requests` conversations (different images and
prompt lengths, `--tokens` tokens each, `</s>` suppressed) one by one with `InterleavedGenerator`
and together with `BatchedGenerator` at batch 1, 4, 8 and 16, and prints total tokens/s and the
ratios. The last line is one JSON object with the ratios. With `--real-shapes` the language model
has Llama-2-7B's shapes (random weights, bf16 by default); the vision side stays toy-sized, as it
runs once per prompt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from textbind.batch_generation import BatchedGenerator
from textbind.config import ModelConfig
from textbind.data.conversation import Conversation, Turn
from textbind.generation import DecodingConfig, InterleavedGenerator
from textbind.model.builder import build_model
from textbind.model.mim import MIMModel
from textbind.tiny import build_tiny_pretrained
from textbind.toy.build import TOY_SIZES
from textbind.toy.renderer import ToyRenderer

BATCH_SIZES = (1, 4, 8, 16)
CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle",
            "a small red square on the left and a large blue circle on the right"]
QUESTIONS = ["Describe this image in detail.", "What is this?", "What colour is the shape, and how big is it?",
             "Look at this picture carefully and tell me everything you can see in it, shape by shape."]


def never_stop(_: list[int], logits: torch.Tensor, eos: int = 2) -> torch.Tensor:
    logits = logits.clone()
    logits[eos] = float("-inf")
    return logits


def llama_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32003, max_position_embeddings=4096,
                       attn_implementation="sdpa")


def with_language_model(model: MIMModel, config, device: str, dtype: torch.dtype) -> MIMModel:
    """The same vision side and tokenizer ids, with a randomly initialised language model of `config`'s shapes."""
    from transformers import LlamaForCausalLM

    with torch.device(device):
        language_model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return MIMModel(model.vision_model, model.qformer, model.query_tokens, language_model,
                    model.image_token_id).to(device=device, dtype=dtype).eval()


def requests(count: int) -> list[Conversation]:
    renderer = ToyRenderer()
    return [Conversation([Turn("user", f"{QUESTIONS[index % len(QUESTIONS)]} <image>",
                               [renderer(CAPTIONS[index % len(CAPTIONS)], seed=index)])]) for index in range(count)]


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_against_recompute(generator: InterleavedGenerator, bundle, device: str, tokens: int, eos: int) -> None:
    """Part 1 (the script's original output)."""
    model = generator.model
    image = ToyRenderer()("a small red circle", seed=0)
    conversation = Conversation([Turn("user", "Describe this image in detail. <image>", [image])])
    config = DecodingConfig(max_new_tokens=tokens, max_images=0)

    def stop_never(ids, logits):
        return never_stop(ids, logits, eos)

    generator.generate(conversation, config, logits_processor=stop_never)  # warm-up
    synchronise(device)
    start = time.perf_counter()
    done = generator.generate(conversation, config, logits_processor=stop_never)
    synchronise(device)
    cached = time.perf_counter() - start

    # The same greedy tokens without a cache: one full forward over the growing sequence per token.
    encoded = generator.encoder.encode(conversation, for_inference=True)
    from textbind.data.samples import pixel_values_for

    pixels = pixel_values_for(encoded.images, bundle.image_processor, "bench").to(device=device, dtype=model.dtype)
    ids = list(encoded.input_ids)
    start = time.perf_counter()
    with torch.inference_mode():
        image_embeds = model.encode_images(pixels)
        for token in done.token_ids:
            model(input_ids=torch.tensor([ids], device=device), image_embeds=image_embeds, logits_to_keep=1)
            ids.append(token)
    synchronise(device)
    recompute = time.perf_counter() - start
    count = len(done.token_ids)
    print(f"device={device} prompt={len(encoded.input_ids)} tokens, generated {count} tokens")
    print(f"KV cache        : {count / cached:8.1f} tokens/s")
    print(f"full recompute  : {count / recompute:8.1f} tokens/s")


def batched_against_sequential(generator: InterleavedGenerator, device: str, tokens: int, count: int,
                               eos: int) -> dict[str, float]:
    """Part 2: total tokens/s of batched decoding against the same requests one by one."""
    conversations = requests(count)
    config = DecodingConfig(max_new_tokens=tokens, max_images=0)

    def stop_never(ids, logits):
        return never_stop(ids, logits, eos)

    synchronise(device)
    start = time.perf_counter()
    sequential = [generator.generate(conversation, config, logits_processor=stop_never)
                  for conversation in conversations]
    synchronise(device)
    sequential_seconds = time.perf_counter() - start
    total = sum(len(done.token_ids) for done in sequential)
    sequential_rate = total / sequential_seconds
    print(f"{count} requests x {tokens} tokens (prompts of "
          f"{min(len(generator.prepare_prompt(c)[0]) for c in conversations)}-"
          f"{max(len(generator.prepare_prompt(c)[0]) for c in conversations)} tokens)")
    print(f"one by one      : {sequential_rate:8.1f} tokens/s")
    ratios = {}
    for batch_size in BATCH_SIZES:
        batched = BatchedGenerator(generator, batch_size)
        prepared = [batched.prepare(conversation, config, logits_processor=stop_never)
                    for conversation in conversations]
        synchronise(device)
        start = time.perf_counter()
        results = batched.generate(prepared)
        synchronise(device)
        seconds = time.perf_counter() - start
        rate = sum(len(done.token_ids) for done in results) / seconds
        same = sum(done.token_ids == reference.token_ids for done, reference in zip(results, sequential))
        ratio = rate / sequential_rate
        if batch_size > 1:
            ratios[f"batch_{batch_size}_vs_sequential"] = round(ratio, 2)
        print(f"batch {batch_size:2d}        : {rate:8.1f} tokens/s  {ratio:5.2f}x one by one  "
              f"(same greedy tokens in {same}/{count} answers)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="conversations decoded in part 2")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--real-shapes", action="store_true",
                        help="a random language model of Llama-2-7B's shapes (use a GPU)")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bfloat16 with --real-shapes)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        bundle = build_model(ModelConfig(**build_tiny_pretrained(directory, sizes=TOY_SIZES)))
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.real_shapes else "float32"))
    if args.real_shapes:
        model = with_language_model(bundle.model, llama_7b_config(), args.device, dtype)
    else:
        model = bundle.model.to(device=args.device, dtype=dtype).eval()
    generator = InterleavedGenerator(model, bundle.tokenizer, bundle.image_processor, ToyRenderer())
    eos = bundle.tokenizer.eos_token_id
    print(f"language model: {'Llama-2-7B shapes, random weights' if args.real_shapes else 'toy size'}, "
          f"{dtype}, threads={torch.get_num_threads()}")
    cache_against_recompute(generator, bundle, args.device, args.tokens, eos)
    ratios = batched_against_sequential(generator, args.device, args.tokens, args.requests, eos)
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
