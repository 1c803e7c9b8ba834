"""Training-step throughput of the MIM model on generated conversations: prints samples/s and tokens/s.

    python benchmarks/train_step.py [--device cuda] [--dtype bfloat16] [--batch 8] [--steps 10] [--size toy|tiny]

Compares, on the same batch: the plain causal (B, L) mask path (no caption branches), the dense
(B, 1, L, L) branch mask, and logits for every position vs. only the supervised ones.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from textbind.config import ModelConfig
from textbind.data.collate import collate
from textbind.data.conversation import Conversation, Turn
from textbind.data.samples import prepare_sample
from textbind.data.sequence import ConversationEncoder
from textbind.loss import compute_loss
from textbind.model.builder import build_model
from textbind.tiny import TinySizes, build_tiny_pretrained
from textbind.toy.build import TOY_SIZES
from textbind.toy.renderer import ToyRenderer


def conversations(with_branches: bool, count: int) -> list[Conversation]:
    renderer = ToyRenderer()
    result = []
    for index in range(count):
        image = renderer("a small red circle on the left and a large blue square on the right", seed=index)
        answer = "It shows two shapes, a red circle and a blue square, side by side on white. "
        if with_branches:
            turns = [Turn("user", "Describe <image> and draw it bigger.", [image]),
                     Turn("assistant", answer + "Here it is bigger: <image> and once more: <image>", [image, image],
                          ["a large red circle on the left and a large blue square on the right"] * 2)]
        else:
            turns = [Turn("user", "Describe <image> and say what it shows.", [image]), Turn("assistant", answer * 3)]
        result.append(Conversation(turns, source=f"bench {index}"))
    return result


def time_steps(model, batch, steps: int, return_logits: bool, device: str) -> float:
    timings = []
    for _ in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = compute_loss(model, batch, return_logits=return_logits)
        output.loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", choices=["tiny", "toy"], default="toy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        sizes = TOY_SIZES if args.size == "toy" else TinySizes()
        paths = build_tiny_pretrained(directory, sizes=sizes)
        bundle = build_model(ModelConfig(**paths, dtype=args.dtype, trainable=[
            "vision_model", "query_tokens", "qformer", "qformer_projection", "language_model"]))
    model = bundle.model.to(args.device)
    encoder = ConversationEncoder(bundle.tokenizer, model.num_query_tokens, 1024)
    print(f"device={args.device} dtype={args.dtype} batch={args.batch} size={args.size} "
          f"threads={torch.get_num_threads()}")
    for with_branches in (False, True):
        samples = [prepare_sample(c, encoder, bundle.image_processor)
                   for c in conversations(with_branches, args.batch)]
        batch = collate(samples, bundle.tokenizer.pad_token_id)
        for return_logits in (True, False):
            seconds = time_steps(model, batch, args.steps, return_logits, args.device)
            mask = "dense 4-D branch mask" if batch.has_branches else "plain causal mask"
            logits = "all logits" if return_logits else "supervised logits only"
            print(f"{mask:24s} {logits:24s} L={batch.input_ids.shape[1]:4d}  {seconds * 1000:8.1f} ms/step  "
                  f"{args.batch / seconds:8.1f} samples/s  {batch.num_tokens / seconds:9.0f} tokens/s")


if __name__ == "__main__":
    main()
