"""Held-out evaluation of a toy-world model: does it describe unseen images and draw what was asked?

    python -m textbind.toy.evaluate --checkpoint runs/quickstart/second_stage/second_stage_model \
        --eval-dir data/toy/eval --out runs/quickstart/eval.json

- `caption_attribute_accuracy`: share of held-out images whose generated description names every
  object's colour, shape and size (and position, for two objects) correctly, and nothing else.
- `describe_colour_accuracy`: a partial-credit diagnostic: share of held-out descriptions that name exactly
  the image's colours (as a set, whatever the grammar) -- it rises long before whole captions are right.
- `drawing_accuracy`: share of held-out drawing / edit requests whose emitted caption parses and
  describes exactly the expected scene.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from textbind.config import load_config
from textbind.data.conversation import Conversation, Turn, parse_record
from textbind.generation import GenerationConfig, InterleavedGenerator
from textbind.model.builder import build_model
from textbind.toy.renderer import ToyRenderer
from textbind.toy.world import COLOURS, parse_caption, scene_attributes_match

logger = logging.getLogger(__name__)

DESCRIBE_PROMPT = "Describe this image. <image>"


def evaluate(generator: InterleavedGenerator, eval_dir: Path, limit: int = 0, progress: bool = True) -> dict[str, Any]:
    """Both held-out sets; per-kind counts and a few failures for inspection."""
    config = GenerationConfig(max_new_tokens=96, do_sample=False, max_images=2)
    describe_items = json.loads((eval_dir / "describe.json").read_text())
    draw_items = json.loads((eval_dir / "draw.json").read_text())
    if limit:
        describe_items, draw_items = describe_items[:limit], draw_items[:limit]

    described, colours_right, describe_failures = 0, 0, []
    for index, item in enumerate(tqdm(describe_items, desc="eval describe", disable=not progress)):
        expected = parse_caption(item["scene"])
        conversation = Conversation([Turn("user", DESCRIBE_PROMPT, [str(eval_dir / item["image"])])],
                                    source=f"describe.json item {index}")
        answer = generator.generate_turn(conversation, config).content
        named = {word.strip(".,;:!?").lower() for word in answer.split()} & set(COLOURS)
        colours_right += expected is not None and named == {obj.colour for obj in expected.objects}
        if expected is not None and scene_attributes_match(expected, answer):
            described += 1
        elif len(describe_failures) < 10:
            describe_failures.append({"expected": item["scene"], "answer": answer})

    drawn, draw_failures, kinds = 0, [], Counter()
    for index, item in enumerate(tqdm(draw_items, desc="eval draw", disable=not progress)):
        conversation = parse_record(item, f"draw.json item {index}", str(eval_dir / "images"))
        conversation.image_dir = str(eval_dir / "images")  # the file's image_dir may be relative to elsewhere
        turn = generator.generate_turn(conversation, config)
        emitted = turn.caption_list[0] if turn.caption_list else ""
        expected = parse_caption(item["expected_caption"])
        kind = "edit" if len(conversation.turns) > 1 else "draw"
        kinds[kind] += 1
        if expected is not None and parse_caption(emitted) == expected:
            drawn += 1
            kinds[f"{kind}_correct"] += 1
        elif len(draw_failures) < 10:
            draw_failures.append({"request": conversation.turns[-1].content, "expected": item["expected_caption"],
                                  "emitted": emitted, "answer": turn.content})
    return {
        "caption_attribute_accuracy": described / max(1, len(describe_items)),
        "describe_colour_accuracy": colours_right / max(1, len(describe_items)),
        "drawing_accuracy": drawn / max(1, len(draw_items)),
        "num_eval_examples": {"describe": len(describe_items), "draw": len(draw_items)},
        "drawing_by_kind": {kind: kinds[f"{kind}_correct"] / kinds[kind] for kind in ("draw", "edit") if kinds[kind]},
        "describe_failures": describe_failures,
        "draw_failures": draw_failures,
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
    bundle = build_model(replace(config.model, checkpoint=args.checkpoint))
    bundle.model.eval()
    torch.set_grad_enabled(False)
    generator = InterleavedGenerator.from_bundle(bundle, ToyRenderer())
    result = evaluate(generator, Path(args.eval_dir), args.limit)
    result["eval_seconds"] = time.perf_counter() - started
    if args.train_seconds is not None:
        result["train_seconds"] = args.train_seconds
    if args.pretrain_seconds is not None:
        result["pretrain_seconds"] = args.pretrain_seconds
        if args.train_seconds is not None:
            result["total_train_seconds"] = round(args.pretrain_seconds + args.train_seconds, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if not k.endswith("failures")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
