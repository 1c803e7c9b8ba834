"""The toy world's demo examples: an examples JSON and the PNG images it names, drawn by the toy renderer.

    python3 -m textbind.toy.examples --out data/toy/examples
    bash scripts/run_demo.sh --examples data/toy/examples/examples.json

The demo (`textbind demo --examples FILE`) refuses an examples file whose images are missing, so
the toy quickstart writes its own with this command. The file is the stage-2 JSON the demo reads,
as an object `{"description": ..., "conversations": [...]}`: the description, one line saying what
a toy model knows (built from the world's vocabulary), is shown on the demo's page.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from textbind.toy.renderer import ToyRenderer
from textbind.toy.world import COLOURS, LAYOUT_POSITIONS, SHAPES, SIZES

logger = logging.getLogger(__name__)

EXAMPLES_NAME = "examples.json"
IMAGE_DIR = "images"

# Each example's turns in the stage-2 format; every image is drawn from its caption by the toy renderer.
EXAMPLES: list[list[dict]] = [
    [{"role": "user", "content": "Draw a small red circle."}],
    [{"role": "user", "content": "<image> What do you see?", "image_list": ["blue_square_yellow_triangle.png"],
      "caption_list": ["a large blue square on the left and a small yellow triangle on the right"]}],
    [{"role": "user", "content": "<image> <image> Are the shapes in these images the same colour?",
      "image_list": ["small_red_square.png", "large_red_triangle.png"],
      "caption_list": ["a small red square", "a large red triangle"]}],
    [{"role": "user", "content": "Paint a large orange circle."},
     {"role": "assistant", "content": "Sure! <image>", "image_list": ["large_orange_circle.png"],
      "caption_list": ["a large orange circle"]},
     {"role": "user", "content": "Please change it to green."}],
]


def _words(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else items[0]


def describe_world() -> str:
    """One line: what a model trained on the toy world knows, from the world's own vocabulary."""
    positions = [position for pair in LAYOUT_POSITIONS.values() for position in pair]
    return (
        f"a toy model of the shapes world: it knows {_words([f'{shape}s' for shape in SHAPES])} that are "
        f"{_words(list(COLOURS))} and {_words(SIZES)}, alone or two at once ({_words(positions)}); it describes "
        "and compares such images, draws them and edits its drawings. Anything else (a cat, a greeting) is "
        "outside its world and gets an answer about shapes."
    )


def write_examples(output_dir: str | Path, image_size: int = 64) -> Path:
    """Write `examples.json` and its images under `output_dir`; returns the JSON file."""
    output = Path(output_dir)
    (output / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    renderer = ToyRenderer(image_size=image_size)
    conversations = []
    for turns in EXAMPLES:
        for turn in turns:
            for name, caption in zip(turn.get("image_list", []), turn.get("caption_list", []), strict=True):
                renderer(caption, seed=0).save(output / IMAGE_DIR / name)
        record = {"conversation": turns}
        if any(turn.get("image_list") for turn in turns):
            record["image_dir"] = IMAGE_DIR
        conversations.append(record)
    path = output / EXAMPLES_NAME
    path.write_text(json.dumps({"description": describe_world(), "conversations": conversations}, indent=1) + "\n",
                    encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textbind toy examples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toy/examples", help="folder for examples.json and its images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the drawn images in pixels")
    args = parser.parse_args(argv)
    path = write_examples(args.out, args.image_size)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
