"""Held-out evaluation of a toy-world model: does it describe unseen images and draw what was asked?

    python -m textbind.toy.evaluate --checkpoint runs/quickstart/second_stage/second_stage_model \
        --eval-dir data/toy/eval --out runs/quickstart/eval.json

- `caption_attribute_accuracy`: share of held-out images whose generated description names every
  object's colour, shape and size (and position, for two objects) correctly, and nothing else.
- `describe_colour_accuracy`: a partial-credit diagnostic: share of held-out descriptions that name exactly
  the image's colours (as a set, whatever the grammar) -- it rises long before whole captions are right.
- `drawing_accuracy`: share of held-out drawing / edit requests whose emitted caption parses and
  describes exactly the expected scene (`drawing_by_kind`: plain requests and edits apart;
  `edits_by_kind`: the edits by what they change and how many objects the edited image holds).

The evaluation is the harness's `toy` benchmark (`textbind.toy.benchmark`): its predictions, report.json
and report.html go to the directory named like the output file without its suffix (`runs/quickstart/eval/`),
and this command writes the same numbers, in the fields above, to `--out`. Each run starts afresh (the
weights behind a checkpoint path change between runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from textbind.config import load_config
from textbind.eval.harness import run_benchmark
from textbind.eval.report import write_html_report
from textbind.generation import DecodingConfig, InterleavedGenerator
from textbind.runtime import DecoderKind, GeneratorSetup, build_generator
from textbind.toy.benchmark import DESCRIBE_PROMPT, MAX_IMAGES, MAX_NEW_TOKENS, ToyBenchmark

logger = logging.getLogger(__name__)

__all__ = ["DESCRIBE_PROMPT", "evaluate", "main"]


def evaluate(
    generator: InterleavedGenerator, eval_dir: Path, limit: int = 0, progress: bool = True,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Both held-out sets through the harness; per-kind numbers and a few failures for inspection.

    The harness's files go to `output_dir` (a temporary directory when None).
    """
    config = DecodingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, max_images=MAX_IMAGES)
    benchmark = ToyBenchmark(str(eval_dir), limit_per_set=limit)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(output_dir) if output_dir is not None else Path(scratch)
        report = run_benchmark(generator, benchmark, directory, config, restart=True, progress=progress)
        if output_dir is not None:
            write_html_report(directory, [benchmark.name])
    metrics, details = report["metrics"], report["details"]
    return {
        "caption_attribute_accuracy": metrics["caption_attribute_accuracy"]["value"],
        "describe_colour_accuracy": metrics["describe_colour_accuracy"]["value"],
        "drawing_accuracy": metrics["drawing_accuracy"]["value"],
        "num_eval_examples": details["num_eval_examples"],
        "drawing_by_kind": details["drawing_by_kind"],
        "edits_by_kind": details["edits_by_kind"],
        "describe_failures": details["describe_failures"],
        "draw_failures": details["draw_failures"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy/model.yaml", help="model config YAML")
    parser.add_argument("--checkpoint", required=True, help="trained modules (an export directory)")
    parser.add_argument("--eval-dir", default="data/toy/eval")
    parser.add_argument("--out", required=True, help="where to write the evaluation JSON")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N items of each set")
    parser.add_argument("--train-seconds", type=float, default=None, help="recorded in the output as given")
    parser.add_argument("--pretrain-seconds", type=float, default=None,
                        help="recorded as given (the vision pretraining before stage 1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides)
    started = time.perf_counter()
    setup = GeneratorSetup(model=replace(config.model, checkpoint=args.checkpoint), device="cpu",
                           image_decoder=DecoderKind.TOY)
    generator = build_generator(setup)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    result = evaluate(generator, Path(args.eval_dir), args.limit, output_dir=out.with_suffix(""))
    result["eval_seconds"] = time.perf_counter() - started
    if args.train_seconds is not None:
        result["train_seconds"] = args.train_seconds
    if args.pretrain_seconds is not None:
        result["pretrain_seconds"] = args.pretrain_seconds
        if args.train_seconds is not None:
            result["total_train_seconds"] = round(args.pretrain_seconds + args.train_seconds, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if not k.endswith("failures")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
