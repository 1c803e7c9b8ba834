"""Data-engine speed: conversations/s against the toy LLM server at concurrency 1 vs 16, and where the time goes.

    python benchmarks/datagen.py [--pairs 400] [--conversations 200] [--encoder hashing|blip2]

Starts `textbind toy llm-server` on a free port, writes toy image-caption pairs, embeds and clusters
them once, then runs the generate step from a fresh journal at each concurrency and prints
conversations/s and their ratio. Last, the whole engine (embed, cluster, generate, filter, export) runs
at concurrency 16, and the share of its wall time spent outside the LLM calls (no request in flight)
is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textbind.datagen.config import load_datagen_config  # noqa: E402
from textbind.datagen.generate import run_generate  # noqa: E402
from textbind.datagen.run import run_steps  # noqa: E402
from textbind.toy.datagen import write_pairs  # noqa: E402


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    port_file = directory / "port"
    process = subprocess.Popen([sys.executable, "-m", "textbind", "toy", "llm-server", "--port", "0",
                                "--port-file", str(port_file)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not port_file.is_file():
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError("the toy LLM server did not start")
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port_file.read_text().strip()}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--encoder", choices=("hashing", "blip2"), default="hashing",
                        help="blip2: the tiny random BLIP-2 vision encoder, built offline")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        server, base_url = start_server(directory)
        try:
            pairs = write_pairs(directory / "pairs", arguments.pairs, seed=0)
            encoder = ["embed.encoder=hashing", "embed.modality=caption"]
            if arguments.encoder == "blip2":
                from textbind.tiny import build_tiny_pretrained

                paths = build_tiny_pretrained(directory / "tiny", seed=0)
                encoder = [f"embed.model_path={paths['vision_model']}", f"embed.processor_path={paths['processor']}"]
            overrides = [f"pairs.path={pairs}", f"llm.base_url={base_url}", "llm.model=toy-writer",
                         f"sample.num_conversations={arguments.conversations}", "sample.max_image_reuse=10",
                         "cluster.num_clusters=16", "run.progress=false", "export.valid_size=10",
                         "export.test_size=10", *encoder]
            base = directory / "base"
            run_steps(load_datagen_config(None, overrides + [f"run.output_dir={base}"]), ("embed", "cluster"))
            rates = {}
            for concurrency in (1, 16):
                output = directory / f"concurrency{concurrency}"
                shutil.copytree(base, output)
                config = load_datagen_config(None, overrides + [f"run.output_dir={output}",
                                                                f"llm.concurrency={concurrency}"])
                report = run_generate(config)
                rates[concurrency] = report["answered_now"] / report["seconds"]
                print(f"concurrency {concurrency:2d}: {report['answered_now']} conversations in "
                      f"{report['seconds']:.2f} s = {rates[concurrency]:.1f} conversations/s, "
                      f"{report['completion_tokens_per_second']:.0f} completion tokens/s")
            print(f"speed-up at concurrency 16 over 1: {rates[16] / rates[1]:.2f}x")

            output = directory / "whole"
            config = load_datagen_config(None, overrides + [f"run.output_dir={output}", "llm.concurrency=16"])
            started = time.perf_counter()
            report = run_steps(config)
            wall = time.perf_counter() - started
            busy = report["generate"]["busy_seconds"]
            print(f"whole engine ({arguments.pairs} pairs, {arguments.conversations} conversations): {wall:.2f} s; "
                  f"steps {report['seconds']}")
            print(f"time outside the LLM calls: {100 * (1 - busy / wall):.1f}% of the whole run, "
                  f"{100 * (1 - busy / report['generate']['seconds']):.1f}% of the generate step")
        finally:
            server.terminate()
            server.wait(timeout=20)


if __name__ == "__main__":
    main()
