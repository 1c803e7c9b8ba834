"""Image decoders: turn a caption the language model wrote into an image."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from PIL import Image

from textbind.config import torch_dtype

if TYPE_CHECKING:  # diffusers takes seconds to import; only the loaders below need it at run time
    from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline


@runtime_checkable
class ImageDecoder(Protocol):
    """Renders one caption. Implementations must be deterministic for a given seed."""

    def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image: ...


logger = logging.getLogger(__name__)

SDXL_BASE_CLASS_NAME = "StableDiffusionXLPipeline"



def resolve_dtype(device: str | torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The weight dtype to load with: `dtype` if given (a torch dtype or "fp16"/"bf16"/"fp32"),
    else float16 on CUDA (what SDXL is released and run in) and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return torch_dtype(dtype)


def pipeline_class_name(path: str | Path, role: str = "diffusers pipeline") -> str:
    """The `_class_name` recorded in a saved pipeline's model_index.json; raises if `path` holds none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{role} path does not exist: {path}")
    model_index = path / "model_index.json"
    if not model_index.is_file():
        raise FileNotFoundError(
            f"{role} path {path} has no model_index.json; expected a directory written by "
            "DiffusionPipeline.save_pretrained (a local snapshot, nothing is downloaded)"
        )
    return json.loads(model_index.read_text(encoding="utf-8"))["_class_name"]


def make_generator(device: str | torch.device, seed: int | None) -> torch.Generator | None:
    """A generator on the device the latents are drawn on; None (global RNG) when no seed is given.

    The same seed gives the same image on the same kind of device; CPU and CUDA streams differ.
    """
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _load_pipeline(
    pipeline_class: type[DiffusionPipeline],
    path: str | Path,
    *,
    role: str,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    variant: str | None,
    show_progress: bool,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
    **components: Any,
) -> DiffusionPipeline:
    """Load a saved pipeline from a local directory only, move it to `device`, quiet its progress bar.

    `cpu_offload` keeps each part on the CPU until it runs (accelerate's model offload: a GPU needs
    only the largest part's memory); `vae_tiling` decodes large images tile by tile.
    """
    pipeline_class_name(path, role)  # fails early, naming the path, if it is not a saved pipeline
    weights_dtype = resolve_dtype(device, dtype)
    logger.info("Loading %s from %s (device=%s, dtype=%s)", role, path, device, weights_dtype)
    pipeline = pipeline_class.from_pretrained(
        str(path), dtype=weights_dtype, variant=variant, local_files_only=True, **components
    )
    if cpu_offload and torch.device(device).type == "cuda":
        pipeline.enable_model_cpu_offload(device=torch.device(device))
    else:
        if cpu_offload:
            logger.warning("cpu_offload needs a CUDA device; %s runs on %s as it is", role, device)
        pipeline = pipeline.to(device)
    if vae_tiling and getattr(pipeline, "vae", None) is not None:
        pipeline.vae.enable_tiling()
    pipeline.set_progress_bar_config(disable=not show_progress)
    return pipeline


def _check_schedule(num_inference_steps: int, high_noise_frac: float, *, with_refiner: bool) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if with_refiner and not 0.0 < high_noise_frac < 1.0:
        raise ValueError(f"high_noise_frac must lie strictly between 0 and 1, got {high_noise_frac}")


class DiffusersDecoder:
    """Any diffusers text-to-image pipeline behind `ImageDecoder`: the caption is the prompt, the first
    image is the answer. `call_kwargs` (steps, guidance, size, ...) are passed on every call."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        *,
        call_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.call_kwargs = dict(call_kwargs or {})
        self.device = torch.device(device) if device is not None else pipeline.device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        variant: str | None = None,
        show_progress: bool = False,
        cpu_offload: bool = False,
        vae_tiling: bool = False,
        **extra_call_kwargs: Any,
    ) -> DiffusersDecoder:
        """Load whatever pipeline class `path/model_index.json` names; None arguments keep its defaults."""
        from diffusers import DiffusionPipeline

        pipeline = _load_pipeline(
            DiffusionPipeline,
            path,
            role="text-to-image pipeline",
            device=device,
            dtype=dtype,
            variant=variant,
            show_progress=show_progress,
            cpu_offload=cpu_offload,
            vae_tiling=vae_tiling,
        )
        call_kwargs = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "negative_prompt": negative_prompt,
            **extra_call_kwargs,
        }
        call_kwargs = {name: value for name, value in call_kwargs.items() if value is not None}
        return cls(pipeline, call_kwargs=call_kwargs, device=device)

    def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image:
        logger.debug("Rendering %r (seed=%s)", caption, seed)
        output = self.pipeline(
            prompt=caption, generator=make_generator(self.device, seed), output_type="pil", **self.call_kwargs
        )
        return output.images[0]


class SDXLDecoder:
    """Stable Diffusion XL as TextBind runs it: the base denoises the first `high_noise_frac` of the
    schedule and hands its latents to the refiner, which finishes the remaining steps (an "ensemble of
    expert denoisers"). Without a refiner the base runs the whole schedule."""

    def __init__(
        self,
        base: StableDiffusionXLPipeline,
        refiner: StableDiffusionXLImg2ImgPipeline | None = None,
        *,
        num_inference_steps: int = 40,
        high_noise_frac: float = 0.8,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        _check_schedule(num_inference_steps, high_noise_frac, with_refiner=refiner is not None)
        self.base = base
        self.refiner = refiner
        self.num_inference_steps = num_inference_steps
        self.high_noise_frac = high_noise_frac
        self.guidance_scale = guidance_scale
        self.height = height
        self.width = width
        self.negative_prompt = negative_prompt
        self.device = torch.device(device) if device is not None else base.device

    @classmethod
    def from_pretrained(
        cls,
        base_path: str | Path,
        refiner_path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        num_inference_steps: int = 40,
        high_noise_frac: float = 0.8,
        guidance_scale: float = 5.0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        variant: str | None = None,
        show_progress: bool = False,
        cpu_offload: bool = False,
        vae_tiling: bool = False,
    ) -> SDXLDecoder:
        """Load the base (and the refiner, if a path is given) from local pipeline directories.

        The refiner reuses the base's `text_encoder_2` and `vae` instead of loading its own copies: the
        released refiner holds the same weights, and sharing saves about 1.5 GB of memory.
        `variant="fp16"` picks the half-precision weight files of the released checkpoints.
        """
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        # Fail on bad arguments or a missing refiner before the slow load of the base.
        _check_schedule(num_inference_steps, high_noise_frac, with_refiner=refiner_path is not None)
        if refiner_path is not None:
            pipeline_class_name(refiner_path, "SDXL refiner")
        base = _load_pipeline(
            StableDiffusionXLPipeline,
            base_path,
            role="SDXL base",
            device=device,
            dtype=dtype,
            variant=variant,
            show_progress=show_progress,
            cpu_offload=cpu_offload,
            vae_tiling=vae_tiling,
        )
        refiner = None
        if refiner_path is not None:
            refiner = _load_pipeline(
                StableDiffusionXLImg2ImgPipeline,
                refiner_path,
                role="SDXL refiner",
                device=device,
                dtype=dtype,
                variant=variant,
                show_progress=show_progress,
                cpu_offload=cpu_offload,
                vae_tiling=vae_tiling,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
            )
        return cls(
            base,
            refiner,
            num_inference_steps=num_inference_steps,
            high_noise_frac=high_noise_frac,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            device=device,
        )

    def __call__(self, caption: str, *, seed: int | None = None) -> Image.Image:
        logger.debug("Rendering %r (seed=%s)", caption, seed)
        # One generator for both stages keeps the pair deterministic even with stochastic schedulers.
        generator = make_generator(self.device, seed)
        shared = {
            "prompt": caption,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "generator": generator,
        }
        size = {"height": self.height, "width": self.width}
        if self.refiner is None:
            return self.base(**shared, **size, output_type="pil").images[0]
        latents = self.base(
            **shared, **size, denoising_end=self.high_noise_frac, output_type="latent"
        ).images  # (1, 4, height / 8, width / 8), still noisy
        return self.refiner(
            **shared, image=latents, denoising_start=self.high_noise_frac, output_type="pil"
        ).images[0]

    def render_batch(self, captions: list[str], seeds: list[int | None]) -> list[Image.Image]:
        """Several captions in one pass of each pipeline (for batched decoding: captions closed together).

        Each image gets its own generator, so it starts from the noise it would start from alone; the
        batched networks may still differ from single runs in the last bits of low-precision arithmetic.
        """
        logger.debug("Rendering %d captions together", len(captions))
        generators = []
        for seed in seeds:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            generators.append(generator)
        negative = None if self.negative_prompt is None else [self.negative_prompt] * len(captions)
        shared = {
            "prompt": list(captions),
            "negative_prompt": negative,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "generator": generators,
        }
        size = {"height": self.height, "width": self.width}
        if self.refiner is None:
            return list(self.base(**shared, **size, output_type="pil").images)
        latents = self.base(**shared, **size, denoising_end=self.high_noise_frac, output_type="latent").images
        return list(self.refiner(**shared, image=latents, denoising_start=self.high_noise_frac,
                                 output_type="pil").images)


def create_image_decoder(kind: Any, options: Any, device: str | torch.device = "cpu") -> ImageDecoder | None:
    """The one place that turns a `textbind.runtime.DecoderKind` and its `DiffusionOptions` into a decoder.

    `none` gives None (captions are reported, not rendered); `toy` the toy world's procedural renderer
    (imported here only, so product code never depends on the toy world); `sdxl` and `diffusers` load
    the pipelines in `options.base` / `options.refiner`.
    """
    kind = getattr(kind, "value", kind)
    if kind == "none":
        return None
    if kind == "toy":
        from textbind.toy.renderer import ToyRenderer

        return ToyRenderer()
    common = {
        "device": device, "dtype": options.dtype, "num_inference_steps": options.steps,
        "guidance_scale": options.guidance_scale, "height": options.height, "width": options.width,
        "negative_prompt": options.negative_prompt, "variant": options.variant,
        "cpu_offload": options.cpu_offload, "vae_tiling": options.vae_tiling,
    }
    if not options.base:
        raise ValueError(f"image decoder {kind} needs a base pipeline directory")
    if kind == "sdxl":
        return SDXLDecoder.from_pretrained(options.base, options.refiner or None,
                                           high_noise_frac=options.high_noise_frac, **common)
    if kind == "diffusers":
        if options.refiner:
            raise ValueError(f"a refiner ({options.refiner}) needs the sdxl image decoder")
        return DiffusersDecoder.from_pretrained(options.base, **common)
    raise ValueError(f"unknown image decoder {kind!r}; choose none, sdxl, diffusers or toy")
