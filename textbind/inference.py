"""Batch inference: answer every conversation of a stage-2 JSON file with a generated assistant turn.

    python -m textbind.inference --config configs/model/llama2_7b.yaml \
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

The argument helpers here are shared with `python -m textbind` (one prompt at a time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from textbind.config import ConfigError, ModelConfig, load_config
from textbind.data.conversation import DataError, parse_record, validate_conversation
from textbind.generation import GenerationConfig, InterleavedGenerator
from textbind.image_decoder import ImageDecoder, build_image_decoder

logger = logging.getLogger(__name__)

DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the path flags, --device/--dtype and trailing key=value overrides."""
    group = parser.add_argument_group("model")
    group.add_argument("--config", help="YAML run config whose `model:` section names the model parts")
    group.add_argument("--checkpoint", help="trained modules to load (our export directory or second_stage_model.pt)")
    group.add_argument("--vision-model", help="Blip2VisionModel directory")
    group.add_argument("--qformer", help="query tokens + Q-Former weights file")
    group.add_argument("--language-model", help="Llama directory (weights + tokenizer)")
    group.add_argument("--processor", help="BLIP-2 image processor directory")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    group.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="model dtype (default: the config's model.dtype)")
    group.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=float16")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationConfig()
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=defaults.temperature)
    group.add_argument("--top-p", type=float, default=defaults.top_p)
    group.add_argument("--seed", type=int, default=defaults.seed, help="sampling and image seed")
    group.add_argument("--max-images", type=int, default=defaults.max_images, help="images per answer")
    group.add_argument("--max-caption-tokens", type=int, default=defaults.max_caption_tokens)
    group.add_argument("--max-length", type=int, default=0,
                       help="context limit in tokens (0: the language model's max_position_embeddings)")


def add_image_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image decoder (without one, captions are reported but not rendered)")
    group.add_argument("--sd-base", default="", help="SDXL base pipeline directory (or any text-to-image pipeline)")
    group.add_argument("--sd-refiner", default="", help="SDXL refiner pipeline directory")
    group.add_argument("--sd-steps", type=int, default=40, help="denoising steps, base and refiner together")
    group.add_argument("--sd-high-noise-frac", type=float, default=0.8, help="where the base hands over")
    group.add_argument("--sd-guidance-scale", type=float, default=5.0)
    group.add_argument("--sd-height", type=int, default=None)
    group.add_argument("--sd-width", type=int, default=None)
    group.add_argument("--sd-dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on CPU)")
    group.add_argument("--toy-renderer", action="store_true",
                       help="draw captions with the toy world's procedural renderer instead of SDXL")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def model_config_from_arguments(args: argparse.Namespace) -> ModelConfig:
    """The YAML config's model section, then key=value overrides, then the convenience flags."""
    overrides = list(args.overrides)
    flags = {
        "checkpoint": args.checkpoint,
        "vision_model": args.vision_model,
        "qformer": args.qformer,
        "language_model": args.language_model,
        "processor": args.processor,
        "dtype": DTYPE_NAMES[args.dtype] if args.dtype else None,
    }
    overrides += [f"model.{key}={value}" for key, value in flags.items() if value is not None]
    return load_config(args.config, overrides).model


def generation_config_from_arguments(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_images=args.max_images,
        max_caption_tokens=args.max_caption_tokens,
    ).validate()


def image_decoder_from_arguments(args: argparse.Namespace, device: torch.device) -> ImageDecoder | None:
    if args.toy_renderer:
        if args.sd_base:
            raise SystemExit("--toy-renderer and --sd-base are alternatives: give one")
        from textbind.toy.renderer import ToyRenderer

        return ToyRenderer()
    return build_image_decoder(
        args.sd_base or None,
        args.sd_refiner or None,
        device=device,
        dtype=args.sd_dtype,
        num_inference_steps=args.sd_steps,
        high_noise_frac=args.sd_high_noise_frac,
        guidance_scale=args.sd_guidance_scale,
        height=args.sd_height,
        width=args.sd_width,
    )


def build_generator(args: argparse.Namespace) -> InterleavedGenerator:
    """Load the model (no pickle: see `textbind.model.builder`), move it to the device, add the decoder."""
    from textbind.model.builder import build_model

    device = resolve_device(args.device)
    model_config = model_config_from_arguments(args)
    if device.type == "cpu" and model_config.dtype == "float16":
        logger.warning("float16 on the CPU is slow and partly unsupported; consider --dtype float32")
    # Nothing trains here; an empty list also saves the checks `set_trainable` would do on each part.
    bundle = build_model(replace(model_config, trainable=[], gradient_checkpointing=False))
    bundle.model.to(device).eval()
    decoder = image_decoder_from_arguments(args, device)
    logger.info("model on %s in %s; image decoder: %s", device, model_config.dtype, type(decoder).__name__)
    return InterleavedGenerator.from_bundle(bundle, decoder, max_length=args.max_length or None)


def _write_json_atomically(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, ensure_ascii=False, indent=2)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run_inference(
    generator: InterleavedGenerator,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: GenerationConfig,
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
    _write_json_atomically(results, output_file)
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
    config: GenerationConfig,
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="stage-2 JSON file; each record ends with a user turn")
    parser.add_argument("--output", required=True, help="results JSON file (images go beside it)")
    parser.add_argument("--image-dir", default="", help="image directory for records without an image_dir")
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N records (0: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    add_image_decoder_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = generation_config_from_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        generator = build_generator(args)
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
