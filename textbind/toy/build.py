"""The toy world's small "pretrained" set: random weights sized for the shapes world, a toy tokenizer.

    python -m textbind.toy.build --out checkpoint/toy --data data/toy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from textbind.tiny import TinySizes, build_tiny_pretrained

TOY_SIZES = TinySizes(
    image_size=64,
    patch_size=8,
    vision_hidden=96,
    vision_layers=3,
    qformer_hidden=96,
    qformer_layers=2,
    num_query_tokens=8,
    llm_hidden=192,
    llm_layers=3,
    llm_heads=6,
    llm_kv_heads=2,
    llm_intermediate=512,
    vocab_size=700,
    blip2_initializer_range=0.1,  # about 1 / sqrt(width): the image reaches the language model from the start
)


def toy_corpus(stage2_json: Path, limit: int = 3000) -> list[str]:
    """Every text of the first `limit` conversations: the tokenizer learns the world's words whole."""
    corpus = []
    for record in json.loads(Path(stage2_json).read_text())[:limit]:
        for turn in record["conversation"]:
            corpus.append(turn["content"])
            corpus += turn.get("caption_list") or []
    return corpus


def build_toy_pretrained(output_dir: str | Path, stage2_json: str | Path, seed: int = 0,
                         sizes: TinySizes = TOY_SIZES) -> dict[str, str]:
    return build_tiny_pretrained(output_dir, seed=seed, sizes=sizes, corpus=toy_corpus(Path(stage2_json)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="checkpoint/toy")
    parser.add_argument("--data", default="data/toy", help="toy data directory (its stage2/train.json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, path in build_toy_pretrained(args.out, Path(args.data) / "stage2/train.json", args.seed).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
