"""Batch inference: answer every conversation of a stage-2 JSON file with a generated assistant turn.

    textbind infer --config configs/model/llama2_7b.yaml \
        --checkpoint checkpoint/second_stage_model.pt \
        --sd-base checkpoint/stable-diffusion-xl-base-1.0 --sd-refiner checkpoint/stable-diffusion-xl-refiner-1.0 \
        --input data/textbind/test.json --output outputs/inference/results.json [key=value ...]

Each record must end with a user turn. The results file holds the records that could be answered,
in input order, each with the generated assistant turn appended and a `record_index` field naming
its place in the input. Generated images are written as PNG files into `<output stem>_images/`
beside the results file and referenced in the new turn's `image_list` by absolute path, so the
results are themselves a valid stage-2 file (add a user turn and run again for the next round).
Without an image decoder the new turn's `image_list` holds null for each image; its caption is in
`caption_list`. Records that fail validation are reported with their index and skipped.

The model and decoder flags are those of every command that answers conversations (`textbind.runtime`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from textbind.config import ConfigError
from textbind.data.conversation import DataError, parse_record, validate_conversation
from textbind.generation import DecodingConfig, InterleavedGenerator
from textbind.io import atomic_write_json
from textbind.runtime import (
    add_generation_arguments,
    add_setup_arguments,
    build_generator,
    generation_config_from_arguments,
    setup_from_arguments,
)

logger = logging.getLogger(__name__)

def run_inference(
    generator: InterleavedGenerator,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: DecodingConfig,
    *,
    image_dir: str = "",
    limit: int = 0,
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Answer every record of `input_path`; write the results file and its images.

    Returns (number of records answered, one message per skipped record).
    """
    input_file, output_file = Path(input_path), Path(output_path)
    try:
        records = json.loads(input_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{input_file}: cannot read a JSON list of records ({error})") from error
    if not isinstance(records, list):
        raise DataError(f"{input_file}: expected a JSON list of records")
    if limit:
        records = records[:limit]
    images_dir = output_file.parent / f"{output_file.stem}_images"
    results, errors = [], []
    with logging_redirect_tqdm():
        for index, record in enumerate(tqdm(records, desc="conversations", unit="conv", disable=not progress)):
            try:
                results.append(_answer_record(generator, record, index, input_file, images_dir, config, image_dir))
            except DataError as error:
                logger.warning("skipped: %s", error)
                errors.append(str(error))
    atomic_write_json(output_file, results)
    logger.info("%s: answered %d of %d records", output_file, len(results), len(records))
    if errors:
        logger.warning("skipped %d record(s); see the messages above", len(errors))
    return len(results), errors


def _answer_record(
    generator: InterleavedGenerator,
    record: Any,
    index: int,
    input_file: Path,
    images_dir: Path,
    config: DecodingConfig,
    image_dir: str,
) -> dict[str, Any]:
    """The record with its generated turn appended; DataError naming the record if it is unusable."""
    conversation = parse_record(record, f"{input_file} record {index}", image_dir)
    validate_conversation(conversation, for_inference=True)
    turn = generator.generate_turn(conversation, config)  # DataError: unreadable image, prompt too long
    image_list: list[str | None] = []
    for number, image in enumerate(turn.image_list):
        if image is None:
            image_list.append(None)
            continue
        images_dir.mkdir(parents=True, exist_ok=True)
        image_path = images_dir / f"{index:05d}_{number}.png"
        image.save(image_path)
        image_list.append(str(image_path.resolve()))
    answer = {"role": "assistant", "content": turn.content, "image_list": image_list, "caption_list": turn.caption_list}
    return {**record, "conversation": [*record["conversation"], answer], "record_index": index}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textbind infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="stage-2 JSON file; each record ends with a user turn")
    parser.add_argument("--output", required=True, help="results JSON file (images go beside it)")
    parser.add_argument("--image-dir", default="", help="image directory for records without an image_dir")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N records (0: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_setup_arguments(parser)
    add_generation_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = generation_config_from_arguments(args)
        setup = setup_from_arguments(args)
    except ValueError as error:  # ConfigError too
        parser.error(str(error))
    try:
        generator = build_generator(setup)
        answered, errors = run_inference(
            generator, args.input, args.output, config, image_dir=args.image_dir, limit=args.limit,
            progress=not args.no_progress,
        )
    except (ConfigError, DataError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {answered} result(s) to {args.output}; skipped {len(errors)} record(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
