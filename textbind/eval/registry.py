"""The benchmarks of `textbind eval`: name -> module path, imported only when the benchmark runs.

Each module exposes `build_benchmark(data_path: str, options: EvalConfig)` returning an object that
follows `textbind.eval.harness.Benchmark`. The toy world's benchmark lives with the toy world
(`textbind.toy.benchmark`); naming it here by path keeps product code free of toy imports.
"""

from __future__ import annotations

import importlib
from typing import Any

from textbind.config import ConfigError
from textbind.eval.config import EvalConfig

BENCHMARKS = {
    "textbind": "textbind.eval.textbind_eval",  # TextBindEval on a stage-2 JSON file
    "mme": "textbind.eval.mme",  # the MME benchmark folder
    "mmbench": "textbind.eval.mmbench",  # an MMBench TSV file
    "toy": "textbind.toy.benchmark",  # the toy world's held-out sets (data/toy/eval)
}


def build_benchmark(name: str, data_path: str, options: EvalConfig) -> Any:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).build_benchmark(data_path, options)
