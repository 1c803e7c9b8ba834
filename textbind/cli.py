"""The `textbind` command: one entry point whose subcommands are the modules' own `main(argv)` functions.

    textbind train --config configs/train/first_stage.yaml [key=value ...]
    textbind toy datagen --out data/toy
    python -m textbind ...          (the same command)

A subcommand is a module with `main(argv: list[str] | None) -> int | None` that parses its own
arguments (its parser's `prog` is `textbind NAME`); adding one is one line in `COMMANDS`. Modules are
imported only when their command runs, so `textbind --help` stays fast and needs no optional extra.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from textbind import __version__

SUMMARY = "TextBind: multi-turn interleaved multimodal conversations (train, evaluate, serve, make data)."

# name -> (module, one-line summary), or name -> (summary, {sub-name: (module, summary)}) for a group.
Command = tuple[str, str]
COMMANDS: dict[str, Command | tuple[str, dict[str, Command]]] = {
    "train": ("textbind.train", "train stage 1 or 2 (under DeepSpeed's launcher: scripts/run_*_stage.sh)"),
    "validate": ("textbind.validate", "validation loss of a model on held-out shards or conversations"),
    "infer": ("textbind.inference", "answer every conversation of a stage-2 JSON file"),
    "chat": ("textbind.chat", "answer one prompt (text and images), streaming"),
    "demo": ("textbind.serve.app", "the Gradio chat demo in the browser"),
    "prepare-blip2": ("textbind.prepare_blip2", "split a BLIP-2 checkpoint into vision model and Q-Former"),
    "tiny": ("textbind.tiny", "build the tiny random model set (tests, smoke runs)"),
    "toy": ("the embedded toy shapes world", {
        "datagen": ("textbind.toy.datagen", "write the toy world's data (shards, conversations, eval sets)"),
        "build": ("textbind.toy.build", "build the toy world's small random model"),
        "pretrain": ("textbind.toy.pretrain", "pretrain the toy vision encoder and Q-Former"),
        "evaluate": ("textbind.toy.evaluate", "held-out evaluation of a toy model"),
        "llm-server": ("textbind.toy.llm_server", "the scripted toy conversation writer (OpenAI-compatible server)"),
    }),
    "datagen": ("the data engine: image-caption pairs -> interleaved conversations -> stage-2 data", {
        "run": ("textbind.datagen.run", "every step in order: embed, cluster, generate, filter, export"),
        "embed": ("textbind.datagen.embed", "embed the images of the pairs (cached per input shard)"),
        "cluster": ("textbind.datagen.cluster", "cluster the embeddings into topics, drop near-duplicates"),
        "generate": ("textbind.datagen.generate", "sample images per conversation and ask the LLM (resumable)"),
        "filter": ("textbind.datagen.filters", "filter raw LLM transcripts (raw.jsonl) with per-rule counts"),
        "export": ("textbind.datagen.export", "write train/valid/test stage-2 JSON, images and stats.json"),
        "rate": ("textbind.datagen.rate", "rate generated conversations in the browser (CSV of ratings)"),
        "promote": ("textbind.datagen.promote", "add the best-rated conversations to the seed-example pool"),
        "fetch-images": ("textbind.datagen.fetch_images", "download the released data's images from url_list"),
        "convert": ("textbind.datagen.convert", "convert LLaVA-Instruct, cc_sbu_align or Alpaca data to stage 2"),
    }),
    "eval": ("textbind.eval.cli", "score a model: TextBindEval, MME, MMBench, toy (report.html)"),
    "serve": ("textbind.serve.api", "OpenAI-compatible API server with text and image answers"),
    "export": ("textbind.export_hf", "write a trained model as a stock transformers Blip2 directory"),
}


def _is_group(entry: Command | tuple[str, dict[str, Command]]) -> bool:
    return isinstance(entry[1], dict)


def _usage(prefix: str, commands: dict, summary: str = "") -> str:
    width = max(len(name) for name in commands) + 2
    lines = [f"usage: {prefix} COMMAND [ARGS ...]", ""]
    if summary:
        lines += [summary, ""]
    lines.append("commands:")
    for name, entry in commands.items():
        lines.append(f"  {name:<{width}}{entry[0] if _is_group(entry) else entry[1]}")
    lines += ["", f"`{prefix} COMMAND --help` describes each command."]
    return "\n".join(lines)


def run_command(module_name: str, prog: str, argv: list[str]) -> int:
    """Import `module_name` and run its `main(argv)`; its parser is told to call itself `prog`."""
    module = importlib.import_module(module_name)
    previous = sys.argv[0]
    sys.argv[0] = prog  # argparse's default prog, for modules that do not take one
    try:
        result = module.main(argv)
    finally:
        sys.argv[0] = previous
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed's launcher puts `--local_rank=N` right after the module (`-m textbind --local_rank=0 train ...`):
    # hand it to the subcommand, whose parser accepts it.
    launcher = [argument for argument in arguments if argument.startswith(("--local_rank=", "--local-rank="))]
    arguments = [argument for argument in arguments if argument not in launcher] + launcher
    prefix, commands, summary = "textbind", COMMANDS, SUMMARY
    while True:
        if not arguments or arguments[0] in ("-h", "--help"):
            print(_usage(prefix, commands, summary))
            return 0 if arguments else 2
        if arguments[0] == "--version" and prefix == "textbind":
            print(f"textbind {__version__}")
            return 0
        name, *arguments = arguments
        if name not in commands:
            print(_usage(prefix, commands), file=sys.stderr)
            print(f"\n{prefix}: unknown command {name!r}", file=sys.stderr)
            return 2
        entry = commands[name]
        prefix = f"{prefix} {name}"
        if not _is_group(entry):
            return run_command(entry[0], prefix, arguments)
        summary, commands = entry


if __name__ == "__main__":
    sys.exit(main())
