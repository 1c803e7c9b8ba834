"""Scoring speed of the evaluation harness: TextBindEval's text metrics and bootstrap intervals per item count.

    python benchmarks/eval_scoring.py [--items 500]

Generation dominates a real run; this measures what is left (scoring finished predictions), on synthetic
answers of about 40 words against references of about 40 words.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from textbind.eval.config import EvalConfig
from textbind.eval.textbind_eval import TextBindEval

WORDS = ("the a small large red blue green circle square dog cat park runs sits on in of left right image shows "
         "here is one and with beside near happily sure draw picture").split()


def sentence(rng: random.Random, length: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length)) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    records = [{"id": str(index), "error": None,
                "reference": {"record": index, "turn": 1, "content": sentence(rng), "images": [], "captions": []},
                "prediction": {"content": sentence(rng), "captions": [], "images": []}}
               for index in range(args.items)]
    benchmark = TextBindEval("unused.json", EvalConfig())
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        scores = benchmark.score(records, Path(directory))
        seconds = time.perf_counter() - started
    print(f"{args.items} items scored (BLEU-2/4 with 1000-resample intervals, ROUGE-L, diversity, image F1) "
          f"in {seconds:.2f} s: {args.items / seconds:.0f} items/s")
    print({name: round(metric.value, 3) for name, metric in scores.metrics.items()})


if __name__ == "__main__":
    main()
