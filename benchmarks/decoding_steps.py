"""Per-token decoding overhead outside the model: choosing a token from the logits, and streaming text.

    python benchmarks/decoding_steps.py [--vocabulary 32000] [--steps 2000] [--device cpu] [--threads 1]

Part 1 times `sample_next_token` over random (V,) logits through the transformers logits
processors that `DecodingConfig` selects (greedy, temperature + top-p, and top-k + min-p + a
repetition penalty over 256 earlier tokens), against the sorted-cumsum top-p sampler used before
them. Part 2 times the two detokenizers over the tiny tokenizer's pieces of a long text with
accented letters and emoji (byte-fallback pieces): the `tokenizers` DecodeStream one and the
window-decoding fallback. The last line is one JSON object with the numbers (microseconds per token).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from textbind.data.sequence import ConversationEncoder
from textbind.generation import DecodingConfig, IncrementalDetokenizer, StreamDetokenizer, sample_next_token
from textbind.model.builder import load_tokenizer
from textbind.tiny import build_tiny_pretrained

TEXT = ("A red block. Voilà: 5 € and 😀 — here is   a green one! Ünïcode, naïve café, 日本語のテキスト 🎨. " * 40)


def sorted_top_p(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator) -> torch.Tensor:
    """The hand-written sampler the processors replaced (temperature, top-p over sorted probabilities)."""
    scores = logits.float() / config.temperature
    sorted_scores, order = scores.sort(descending=True)
    probabilities = sorted_scores.softmax(dim=-1)
    covered_before = probabilities.cumsum(dim=-1) - probabilities
    sorted_scores = sorted_scores.masked_fill(covered_before >= config.top_p, float("-inf"))
    return order[torch.multinomial(sorted_scores.softmax(dim=-1), 1, generator=generator)]


def microseconds_per_call(function, steps: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        function()
    return (time.perf_counter() - start) / steps * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logits = torch.randn(args.vocabulary, device=device) * 3
    generator = torch.Generator(device=device).manual_seed(0)
    earlier = torch.randint(0, args.vocabulary, (1, 256), device=device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(function) -> float:
        return microseconds_per_call(lambda: (function(), synchronize()), args.steps)

    results: dict[str, float] = {}
    greedy = DecodingConfig()
    nucleus = DecodingConfig(do_sample=True, temperature=0.7, top_p=0.9)
    filtered = DecodingConfig(do_sample=True, temperature=0.7, top_k=50, min_p=0.05, repetition_penalty=1.2)
    results["greedy"] = timed(lambda: sample_next_token(logits, greedy))
    results["top_p_processors"] = timed(lambda: sample_next_token(logits, nucleus, generator))
    results["top_p_sorted_before"] = timed(lambda: sorted_top_p(logits, nucleus, generator))
    results["top_k_min_p_penalty"] = timed(lambda: sample_next_token(logits, filtered, generator, input_ids=earlier))
    print(f"choosing a token, V={args.vocabulary} on {device} (us/token):")
    for name in ("greedy", "top_p_processors", "top_p_sorted_before", "top_k_min_p_penalty"):
        print(f"  {name:24s} {results[name]:9.1f}")

    with tempfile.TemporaryDirectory() as directory:
        tokenizer = load_tokenizer(build_tiny_pretrained(directory, seed=0)["language_model"])
    token_ids = ConversationEncoder(tokenizer, 1).text_ids(TEXT)
    for name, kind in (("decode_stream", StreamDetokenizer), ("window_decoding", IncrementalDetokenizer)):
        detokenizer = kind(tokenizer)
        start = time.perf_counter()
        pieces = [detokenizer.push(token) for token in token_ids]
        results[name] = (time.perf_counter() - start) / len(token_ids) * 1e6
        assert "".join(pieces) + detokenizer.flush() == tokenizer.decode(token_ids, skip_special_tokens=True)
    print(f"streaming text, {len(token_ids)} tokens (us/token):")
    for name in ("decode_stream", "window_decoding"):
        print(f"  {name:24s} {results[name]:9.1f}")
    print(json.dumps({name: round(value, 1) for name, value in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
