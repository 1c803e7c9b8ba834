"""Decoding speed: tokens/s of the KV-cache generator against recomputing the whole prefix each step.

    python benchmarks/generation.py [--device cuda] [--tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from textbind.config import ModelConfig
from textbind.data.conversation import Conversation, Turn
from textbind.generation import GenerationConfig, InterleavedGenerator
from textbind.model.builder import build_model
from textbind.tiny import build_tiny_pretrained
from textbind.toy.build import TOY_SIZES
from textbind.toy.renderer import ToyRenderer


def never_stop(_: list[int], logits: torch.Tensor, eos: int = 2) -> torch.Tensor:
    logits = logits.clone()
    logits[eos] = float("-inf")
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        bundle = build_model(ModelConfig(**build_tiny_pretrained(directory, sizes=TOY_SIZES)))
    model = bundle.model.to(args.device).eval()
    generator = InterleavedGenerator.from_bundle(bundle, ToyRenderer())
    image = ToyRenderer()("a small red circle", seed=0)
    conversation = Conversation([Turn("user", "Describe this image in detail. <image>", [image])])
    config = GenerationConfig(max_new_tokens=args.tokens, max_images=0)
    eos = bundle.tokenizer.eos_token_id

    def stop_never(ids, logits):
        return never_stop(ids, logits, eos)

    generator.generate(conversation, config, logits_processor=stop_never)  # warm-up
    start = time.perf_counter()
    done = generator.generate(conversation, config, logits_processor=stop_never)
    cached = time.perf_counter() - start

    # The same greedy tokens without a cache: one full forward over the growing sequence per token.
    encoded = generator.encoder.encode(conversation, for_inference=True)
    from textbind.data.samples import pixel_values_for

    pixels = pixel_values_for(encoded.images, bundle.image_processor, "bench").to(args.device)
    ids = list(encoded.input_ids)
    start = time.perf_counter()
    with torch.inference_mode():
        image_embeds = model.encode_images(pixels)
        for token in done.token_ids:
            model(input_ids=torch.tensor([ids], device=args.device), image_embeds=image_embeds, logits_to_keep=1)
            ids.append(token)
    recompute = time.perf_counter() - start
    count = len(done.token_ids)
    print(f"device={args.device} prompt={len(encoded.input_ids)} tokens, generated {count} tokens")
    print(f"KV cache        : {count / cached:8.1f} tokens/s")
    print(f"full recompute  : {count / recompute:8.1f} tokens/s")


if __name__ == "__main__":
    main()
