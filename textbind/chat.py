"""Command line for one prompt: `textbind chat --prompt ...` streams the answer and saves its images.

    textbind chat --config configs/model/tiny.yaml --prompt "Describe <image>" --image a.png \\
        [--sd-base DIR --sd-refiner DIR] [--output-dir outputs/chat] [key=value ...]

Each `<image>` in the prompt stands
for one --image, in order; images given without any marker go before the text. The answer's text
is printed as it is generated; each image is saved as a PNG in --output-dir and printed as
`[image: PATH | caption]` where it appears (without an image decoder: `[image not rendered | caption]`).
For a file of conversations, use `textbind infer`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from textbind import IMAGE_TOKEN
from textbind.config import ConfigError
from textbind.data.conversation import Conversation, DataError, Turn, validate_conversation
from textbind.generation import DoneEvent, ImageEvent, TextEvent
from textbind.runtime import (
    add_generation_arguments,
    add_setup_arguments,
    build_generator,
    generation_config_from_arguments,
    setup_from_arguments,
)


def build_prompt(prompt: str, images: list[str], system: str = "") -> Conversation:
    """A one-turn conversation for inference; raises DataError if markers and images disagree or a file is missing."""
    if images and IMAGE_TOKEN not in prompt:
        prompt = " ".join([IMAGE_TOKEN] * len(images) + [prompt])
    turns = [Turn("system", system)] if system else []
    turns.append(Turn("user", prompt, list(images)))
    conversation = Conversation(turns, source="--prompt")
    validate_conversation(conversation, for_inference=True)
    return conversation


def next_free_path(directory: Path, stem: str) -> Path:
    number = 0
    while (directory / f"{stem}_{number}.png").exists():
        number += 1
    return directory / f"{stem}_{number}.png"


def save_image(image: Image.Image, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = next_free_path(directory, "image")
    image.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="textbind chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", required=True, help=f"the user's message; {IMAGE_TOKEN} marks where images go")
    parser.add_argument("--image", action="append", default=[], help="an input image (repeat for several)")
    parser.add_argument("--system", default="", help="an optional system prompt")
    parser.add_argument("--output-dir", default="outputs/chat", help="where generated images are saved")
    parser.add_argument("--verbose", action="store_true", help="log what is loaded")
    add_setup_arguments(parser)
    add_generation_arguments(parser)
    args = parser.parse_intermixed_args(arguments)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        config = generation_config_from_arguments(args)
        setup = setup_from_arguments(args)
        conversation = build_prompt(args.prompt, args.image, args.system)
    except ValueError as error:  # DataError, ConfigError and a bad generation setting alike
        parser.error(str(error))
    try:
        generator = build_generator(setup)
        output_dir = Path(args.output_dir)
        for event in generator.stream(conversation, config):
            if isinstance(event, TextEvent):
                sys.stdout.write(event.text)
            elif isinstance(event, ImageEvent):
                if event.image is None:
                    sys.stdout.write(f"\n[image not rendered | {event.caption}]\n")
                else:
                    sys.stdout.write(f"\n[image: {save_image(event.image, output_dir)} | {event.caption}]\n")
            elif isinstance(event, DoneEvent):
                sys.stdout.write("\n")
                if event.finish_reason != "stop":
                    logging.getLogger(__name__).warning("the answer was cut at the token limit")
            sys.stdout.flush()
    except (ConfigError, DataError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
