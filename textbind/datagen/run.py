"""The whole data engine in order: embed, cluster, generate, filter, export; statistics in report.json.

    LLM_API_KEY=... textbind datagen run --config configs/datagen/default.yaml \\
        pairs.path='data/cc/{00000..00099}.tar' llm.base_url=http://127.0.0.1:8000/v1 llm.model=... \\
        sample.num_conversations=20000 run.output_dir=data/generated

Every step also runs alone (`textbind datagen embed|cluster|generate`, `filter --input raw.jsonl`,
`export --input filtered.jsonl`), and `--steps` picks some of them here. Rerunning the same command
resumes: embeddings come from the cache and answered requests from the journal, so only missing work
is done, and the files come out as an uninterrupted run would write them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from textbind.config import ConfigError, config_to_dict, save_config
from textbind.data.conversation import DataError
from textbind.datagen.config import DatagenConfig, config_from_arguments, step_parser
from textbind.datagen.generate import RAW_NAME, FatalLLMError, run_generate
from textbind.datagen.report import read_jsonl, update_report

logger = logging.getLogger(__name__)

STEPS = ("embed", "cluster", "generate", "filter", "export")
FILTERED_NAME = "filtered.jsonl"


def run_filter(config: DatagenConfig) -> dict:
    """raw.jsonl -> filtered.jsonl, rejected.jsonl, filter_report.json (all in OUTPUT_DIR)."""
    from textbind.datagen.filters import filter_file, format_report

    output_dir = Path(config.run.output_dir)
    result = filter_file(output_dir / RAW_NAME, output_dir, config.filter)
    print(format_report(result.report))
    update_report(output_dir, "filter", result.report)
    return result.report


def run_export(config: DatagenConfig) -> dict:
    """filtered.jsonl -> train.json, valid.json, test.json, images/, stats.json (all in OUTPUT_DIR)."""
    from textbind.datagen.export import export_records

    output_dir = Path(config.run.output_dir)
    path = output_dir / FILTERED_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run the filter step first")
    stats = export_records(list(read_jsonl(path)), output_dir, config.export, image_root=output_dir)
    update_report(output_dir, "export", stats)
    return stats


def run_steps(config: DatagenConfig, steps: tuple[str, ...] = STEPS) -> dict:
    """Run `steps` in the engine's order; return OUTPUT_DIR/report.json's content."""
    from textbind.datagen.cluster import run_cluster
    from textbind.datagen.embed import run_embed

    output_dir = Path(config.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    report = update_report(output_dir, "config", config_to_dict(config))
    timings = {}
    embeddings = None
    for step in STEPS:
        if step not in steps:
            continue
        started = time.perf_counter()
        logger.info("== %s", step)
        if step == "embed":
            embeddings = run_embed(config)
        elif step == "cluster":
            run_cluster(config, embeddings)
        elif step == "generate":
            run_generate(config)
        elif step == "filter":
            run_filter(config)
        else:
            run_export(config)
        timings[step] = round(time.perf_counter() - started, 3)
        report = update_report(output_dir, "seconds", {**report.get("seconds", {}), **timings})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = step_parser("textbind datagen run",
                         "Image-caption pairs -> LLM-written interleaved conversations -> stage-2 data "
                         "(embed, cluster, generate, filter, export). Rerun the same command to resume.")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run, in the engine's order (default: {','.join(STEPS)})")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress bar
    steps = tuple(step.strip() for step in arguments.steps.split(",") if step.strip())
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    try:
        config = config_from_arguments(arguments)
        report = run_steps(config, steps)
    except (ConfigError, DataError, FatalLLMError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {"output_dir": config.run.output_dir, "seconds": report.get("seconds", {})}
    if "export" in report:
        summary["splits"] = report["export"].get("splits")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
