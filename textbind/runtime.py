"""Setting up a generator: one typed description (model, device, dtype, image decoder) built once per entry point.

Every command that answers conversations (`textbind chat`, `infer`, `demo`, `eval`, `serve`) adds
the same flags with `add_setup_arguments`, turns them into a `GeneratorSetup` with
`setup_from_arguments`, and loads it with `build_generator`. Library code takes the dataclass, never
the argparse namespace; it raises exceptions and leaves exiting to the entry points.
"""

from __future__ import annotations

import argparse
import enum
import logging
from dataclasses import dataclass, field, replace

import torch

from textbind.config import DTYPE_NAMES, ConfigError, ModelConfig, load_config
from textbind.generation import DecodingConfig, InterleavedGenerator

logger = logging.getLogger(__name__)


class DecoderKind(str, enum.Enum):
    """Which image decoder renders the captions the model writes."""

    NONE = "none"  # report captions, render nothing
    SDXL = "sdxl"  # SDXL base (+ refiner), as TextBind runs it
    DIFFUSERS = "diffusers"  # any other diffusers text-to-image pipeline
    TOY = "toy"  # the toy world's procedural renderer


@dataclass
class DiffusionOptions:
    """Options of the diffusers-based decoders (SDXL and any text-to-image pipeline)."""

    base: str | None = None  # pipeline directory (or hub id on a machine that may download)
    refiner: str | None = None  # SDXL refiner pipeline
    steps: int = 40  # denoising steps, base and refiner together
    high_noise_frac: float = 0.8  # where the SDXL base hands over to the refiner
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    dtype: str | None = None  # fp16 | bf16 | fp32; None: fp16 on CUDA, fp32 on the CPU
    negative_prompt: str | None = None
    variant: str | None = None  # e.g. "fp16": the half-precision weight files of a release
    cpu_offload: bool = False  # move each pipeline part to the GPU only while it runs (accelerate)
    vae_tiling: bool = False  # decode large images tile by tile


@dataclass
class GeneratorSetup:
    """Everything needed to load an `InterleavedGenerator`."""

    model: ModelConfig
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    image_decoder: DecoderKind = DecoderKind.NONE
    diffusion: DiffusionOptions = field(default_factory=DiffusionOptions)
    max_length: int | None = None  # context limit in tokens; None: the language model's max_position_embeddings

    def validate(self) -> GeneratorSetup:
        if self.image_decoder in (DecoderKind.SDXL, DecoderKind.DIFFUSERS) and not self.diffusion.base:
            raise ConfigError(f"image decoder {self.image_decoder.value} needs a base pipeline (--sd-base)")
        if self.image_decoder not in (DecoderKind.SDXL, DecoderKind.DIFFUSERS) and self.diffusion.refiner:
            logger.info("no diffusion decoder: the refiner %s is not used", self.diffusion.refiner)
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be positive, got {self.max_length}")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: CUDA is not available on this machine")
    return device


def build_generator(setup: GeneratorSetup) -> InterleavedGenerator:
    """Load the model (no pickle: see `textbind.model.builder`) on its device, in eval mode, with its decoder."""
    from textbind.image_decoder import create_image_decoder
    from textbind.model.builder import build_model

    setup.validate()
    device = resolve_device(setup.device)
    if device.type == "cpu" and setup.model.dtype == "float16":
        logger.warning("float16 on the CPU is slow and partly unsupported; consider --dtype float32")
    # Nothing trains here; an empty list also saves the checks `set_trainable` would do on each part.
    bundle = build_model(replace(setup.model, trainable=[], gradient_checkpointing=False))
    bundle.model.to(device).eval()
    decoder = create_image_decoder(setup.image_decoder, setup.diffusion, device)
    logger.info("model on %s in %s; image decoder: %s", device, setup.model.dtype, setup.image_decoder.value)
    return InterleavedGenerator.from_bundle(bundle, decoder, max_length=setup.max_length)


# --- Command-line flags ------------------------------------------------------------------------------------


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
    group.add_argument("--max-length", type=int, default=None,
                       help="context limit in tokens (default: the language model's max_position_embeddings)")
    group.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dtype=float16")


def add_image_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DiffusionOptions()
    group = parser.add_argument_group("image decoder (without one, captions are reported but not rendered)")
    group.add_argument("--image-decoder", choices=["auto", *(kind.value for kind in DecoderKind)], default="auto",
                       help="sdxl (SDXL base + refiner), diffusers (any text-to-image pipeline in --sd-base), "
                            "toy (the toy world's renderer) or none; auto: sdxl or diffusers when --sd-base is "
                            "set (by the pipeline it holds), else none")
    group.add_argument("--sd-base", default="", help="SDXL base pipeline directory (or any text-to-image pipeline)")
    group.add_argument("--sd-refiner", default="", help="SDXL refiner pipeline directory")
    group.add_argument("--sd-steps", type=int, default=defaults.steps,
                       help="denoising steps, base and refiner together")
    group.add_argument("--sd-high-noise-frac", type=float, default=defaults.high_noise_frac,
                       help="where the base hands over")
    group.add_argument("--sd-guidance-scale", type=float, default=defaults.guidance_scale)
    group.add_argument("--sd-height", type=int, default=None)
    group.add_argument("--sd-width", type=int, default=None)
    group.add_argument("--sd-dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on CPU)")
    group.add_argument("--sd-negative-prompt", default=None, help="what the images should not show")
    group.add_argument("--sd-variant", default=None, help="weight variant to load, e.g. fp16")
    group.add_argument("--sd-cpu-offload", action="store_true", help="keep pipeline parts on the CPU until they run")
    group.add_argument("--sd-vae-tiling", action="store_true", help="decode images tile by tile (less memory)")


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and image-decoder flags of every command that answers conversations."""
    add_model_arguments(parser)
    add_image_decoder_arguments(parser)


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


def decoder_kind_from_arguments(args: argparse.Namespace) -> DecoderKind:
    """--image-decoder, with `auto` resolved: the pipeline in --sd-base decides between sdxl and diffusers."""
    if args.image_decoder != "auto":
        return DecoderKind(args.image_decoder)
    if not args.sd_base:
        return DecoderKind.NONE
    from textbind.image_decoder import SDXL_BASE_CLASS_NAME, pipeline_class_name

    try:
        class_name = pipeline_class_name(args.sd_base, "--sd-base")
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    return DecoderKind.SDXL if class_name == SDXL_BASE_CLASS_NAME else DecoderKind.DIFFUSERS


def setup_from_arguments(args: argparse.Namespace) -> GeneratorSetup:
    """The flags of `add_setup_arguments` -> a validated GeneratorSetup (ConfigError names a bad value)."""
    kind = decoder_kind_from_arguments(args)
    uses_diffusion = kind in (DecoderKind.SDXL, DecoderKind.DIFFUSERS)
    diffusion = DiffusionOptions(
        # SD_BASE may be set by a script's defaults while another decoder was chosen: it is not used then.
        base=(args.sd_base or None) if uses_diffusion else None,
        refiner=(args.sd_refiner or None) if uses_diffusion else None,
        steps=args.sd_steps,
        high_noise_frac=args.sd_high_noise_frac,
        guidance_scale=args.sd_guidance_scale,
        height=args.sd_height,
        width=args.sd_width,
        dtype=args.sd_dtype,
        negative_prompt=args.sd_negative_prompt,
        variant=args.sd_variant,
        cpu_offload=args.sd_cpu_offload,
        vae_tiling=args.sd_vae_tiling,
    )
    setup = GeneratorSetup(
        model=model_config_from_arguments(args), device=args.device, image_decoder=kind, diffusion=diffusion,
        max_length=args.max_length or None,
    )
    return setup.validate()


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DecodingConfig()
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=defaults.temperature)
    group.add_argument("--top-p", type=float, default=defaults.top_p)
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="sample among the k most likely; 0: off")
    group.add_argument("--min-p", type=float, default=defaults.min_p, help="min-p sampling threshold; 0: off")
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                       help="> 1 discourages repeating the answer's text (greedy too); 1: off")
    group.add_argument("--seed", type=int, default=defaults.seed, help="sampling and image seed")
    group.add_argument("--max-images", type=int, default=defaults.max_images, help="images per answer")
    group.add_argument("--max-caption-tokens", type=int, default=defaults.max_caption_tokens)


def generation_config_from_arguments(args: argparse.Namespace) -> DecodingConfig:
    return DecodingConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_images=args.max_images,
        max_caption_tokens=args.max_caption_tokens,
    ).validate()
