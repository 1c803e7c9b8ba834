"""The toy world's small "pretrained" set: random weights sized for the shapes world, a toy tokenizer.

    python -m textbind.toy.build --out checkpoint/toy
"""

from __future__ import annotations

import argparse
from pathlib import Path

from textbind.data.streams import CAPTION_INSTRUCTIONS
from textbind.tiny import TinySizes, build_tiny_pretrained
from textbind.toy.datagen import stream_rng, text_records

TOKENIZER_STREAM = "tokenizer"

TOY_SIZES = TinySizes(
    image_size=64,
    patch_size=8,
    vision_hidden=96,
    vision_layers=3,
    qformer_hidden=96,
    qformer_layers=2,
    num_query_tokens=8,
    # The language model costs most of a training step on a CPU, while seeing is what takes long to learn:
    # a narrow one (128) trains about 1.7x faster than 192 wide and is plenty for the toy grammar.
    llm_hidden=128,
    llm_layers=3,
    llm_heads=4,
    llm_kv_heads=2,
    llm_intermediate=344,
    vocab_size=768,
    blip2_initializer_range=0.1,  # about 1 / sqrt(width): the image reaches the language model from the start
    qformer_dropout=0.0,  # nothing to regularise against: every training image is new
    # Position embeddings that start out telling where a patch is: left/right and top/bottom from the start.
    vision_position_sincos=2.0,
)


# The chat markup of every training sequence (textbind.data.sequence), repeated so that BPE merges it.
CHAT_MARKUP = "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n[/INST]"


def toy_corpus(seed: int = 0, num_conversations: int = 3000) -> list[str]:
    """Every text of `num_conversations` toy conversations (the synthetic writer's, from their own random
    stream: the grammar the data engine's toy LLM speaks too), the chat markup and the stage-1 caption
    requests: the tokenizer learns them as whole pieces, so the training sequences stay short (fast on a CPU)."""
    corpus = [CHAT_MARKUP] * 200 + list(CAPTION_INSTRUCTIONS) * 50
    for record in text_records(stream_rng(seed, TOKENIZER_STREAM), num_conversations):
        for turn in record["conversation"]:
            corpus.append(turn["content"])
            corpus += turn.get("caption_list") or []
    return corpus


def build_toy_pretrained(output_dir: str | Path, seed: int = 0, sizes: TinySizes = TOY_SIZES) -> dict[str, str]:
    return build_tiny_pretrained(output_dir, seed=seed, sizes=sizes, corpus=toy_corpus(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoint/toy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, path in build_toy_pretrained(args.out, args.seed).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
