r"""`textbind eval`: score a model on TextBindEval, MME, MMBench or the toy world; report.json and report.html.

    textbind eval textbind --data data/textbind/test.json --output-dir runs/eval \
        --config configs/model/llama2_7b.yaml --checkpoint checkpoint/second_stage_model.pt \
        --sd-base checkpoint/stable-diffusion-xl-base-1.0 --sd-refiner checkpoint/stable-diffusion-xl-refiner-1.0 \
        eval.clip_model=checkpoint/clip-vit-large-patch14 eval.bertscore_model=checkpoint/roberta-large
    textbind eval mme,mmbench --data MME_Benchmark_release_version,MMBench_DEV_EN.tsv --output-dir runs/eval ...
    textbind eval mme --score runs/eval/mme/results      (score any MME results folder; no model)

Several benchmarks are comma-separated, with one --data path each (same order). Each writes
OUTPUT_DIR/<benchmark>/{run.json, predictions.jsonl, images/, report.json}; OUTPUT_DIR/report.html
shows them all. A restarted run skips the items already answered (--restart starts over).
Decoding is greedy unless --do-sample, and seeded (--seed). `eval.key=value` options:

"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from textbind.config import ConfigError, config_help, load_config
from textbind.data.conversation import DataError
from textbind.eval.config import EvalRunConfig
from textbind.eval.harness import run_benchmark
from textbind.eval.registry import BENCHMARKS, build_benchmark
from textbind.eval.report import write_html_report
from textbind.runtime import (
    add_generation_arguments,
    add_setup_arguments,
    build_generator,
    generation_config_from_arguments,
    setup_from_arguments,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textbind eval", description=__doc__ + config_help(EvalRunConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", metavar="BENCHMARK[,BENCHMARK]", help=f"any of {', '.join(BENCHMARKS)}")
    parser.add_argument("--data", default="", help="the benchmark's local path (comma-separated, one per benchmark)")
    parser.add_argument("--output-dir", default="runs/eval", help="where predictions, reports and images go")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items of each benchmark (0: all)")
    parser.add_argument("--restart", action="store_true", help="discard earlier predictions instead of resuming")
    parser.add_argument("--score", metavar="RESULTS_DIR",
                        help="mme only: score an existing results folder (<subtask>.txt files) and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_setup_arguments(parser)
    add_generation_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if args.score:
        if names != ["mme"]:
            parser.error("--score scores MME results folders: use `textbind eval mme --score RESULTS_DIR`")
        from textbind.eval.mme import score_command

        try:
            return score_command(args.score)
        except DataError as error:
            parser.exit(2, f"error: {error}\n")
    data_paths = [path for path in args.data.split(",") if path] if args.data else []
    if len(data_paths) != len(names):
        parser.error(f"--data needs one path per benchmark ({len(names)}), got {len(data_paths)}")

    # key=value overrides: eval.* are the harness's, the rest the model config's.
    eval_overrides = [item for item in args.overrides if item.lstrip("-").startswith("eval.")]
    args.overrides = [item for item in args.overrides if item not in eval_overrides]
    try:
        options = load_config(None, eval_overrides, config_type=EvalRunConfig).eval
        config = generation_config_from_arguments(args)
        setup = setup_from_arguments(args)
        benchmarks = [build_benchmark(name, path, options) for name, path in zip(names, data_paths)]
    except ValueError as error:  # ConfigError too
        parser.error(str(error))
    try:
        for benchmark in benchmarks:  # a malformed benchmark file is reported before the model loads
            logger.info("%s: %d items", benchmark.name, len(benchmark.items()))
        generator = build_generator(setup)
        run_settings = {"setup": asdict(setup), "max_length": generator.max_length}
        summaries = {}
        for benchmark in benchmarks:
            report = run_benchmark(generator, benchmark, args.output_dir, config, limit=args.limit,
                                   restart=args.restart, progress=not args.no_progress, run_settings=run_settings)
            summaries[benchmark.name] = {name: round(metric["value"], 4) for name, metric in report["metrics"].items()
                                         if "/" not in name}
            summaries[benchmark.name]["failed"] = report["num_failed"]
        page = write_html_report(args.output_dir, list(BENCHMARKS), options.report_samples, options.report_metric,
                                 options.bootstrap_seed)
    except (ConfigError, DataError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(summaries, indent=2))
    print(f"wrote {page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
