"""Tests for the image decoders, run end to end on a tiny random SDXL base + refiner on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textbind.image_decoder import (
    DiffusersDecoder,
    ImageDecoder,
    SDXLDecoder,
    create_image_decoder,
    resolve_dtype,
)
from textbind.testing.tiny_sdxl import build_tiny_sdxl

CAPTION = "a red bird sitting on the branch of a tree"
STEPS = 4
HIGH_NOISE_FRAC = 0.5  # two base steps, two refiner steps


@pytest.fixture(scope="session")
def tiny_sdxl_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="session")
def refined_decoder(tiny_sdxl_paths: tuple[str, str]) -> SDXLDecoder:
    base_path, refiner_path = tiny_sdxl_paths
    return SDXLDecoder.from_pretrained(
        base_path, refiner_path, num_inference_steps=STEPS, high_noise_frac=HIGH_NOISE_FRAC
    )


@pytest.fixture(scope="session")
def base_only_decoder(tiny_sdxl_paths: tuple[str, str]) -> SDXLDecoder:
    return SDXLDecoder.from_pretrained(tiny_sdxl_paths[0], num_inference_steps=STEPS)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_base_and_refiner_render_an_image_of_the_expected_size(refined_decoder: SDXLDecoder) -> None:
    image = refined_decoder(CAPTION, seed=0)
    assert isinstance(refined_decoder, ImageDecoder)
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (64, 64)
    assert pixels(image).std() > 0  # not a blank image


def test_refiner_shares_text_encoder_2_and_vae_with_base(refined_decoder: SDXLDecoder) -> None:
    assert refined_decoder.refiner is not None
    assert refined_decoder.refiner.text_encoder_2 is refined_decoder.base.text_encoder_2
    assert refined_decoder.refiner.vae is refined_decoder.base.vae
    assert refined_decoder.refiner.text_encoder is None
    assert refined_decoder.base.dtype == torch.float32  # full precision on the CPU


def test_same_seed_gives_same_pixels_and_another_seed_other_pixels(refined_decoder: SDXLDecoder) -> None:
    first = pixels(refined_decoder(CAPTION, seed=1))
    again = pixels(refined_decoder(CAPTION, seed=1))
    other = pixels(refined_decoder(CAPTION, seed=2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0


def test_base_hands_over_to_refiner(refined_decoder: SDXLDecoder, base_only_decoder: SDXLDecoder) -> None:
    """Each stage denoises its share of the schedule; the refiner's steps change the image."""
    unet_calls = {"base": 0, "refiner": 0}

    def counter(stage: str):
        def hook(*_: object) -> None:
            unet_calls[stage] += 1

        return hook

    assert refined_decoder.refiner is not None
    handles = [
        refined_decoder.base.unet.register_forward_hook(counter("base")),
        refined_decoder.refiner.unet.register_forward_hook(counter("refiner")),
    ]
    try:
        refined = pixels(refined_decoder(CAPTION, seed=3))
    finally:
        for handle in handles:
            handle.remove()
    # Classifier-free guidance batches the conditional and unconditional passes: one UNet call a step.
    assert unet_calls == {"base": 2, "refiner": 2}
    base_only = pixels(base_only_decoder(CAPTION, seed=3))
    assert np.abs(refined - base_only).max() > 0


def test_base_only_runs_all_steps_and_honours_the_size(tiny_sdxl_paths: tuple[str, str]) -> None:
    decoder = SDXLDecoder.from_pretrained(tiny_sdxl_paths[0], num_inference_steps=2, height=32, width=48)
    assert decoder.refiner is None
    image = decoder(CAPTION, seed=0)
    assert image.size == (48, 32)  # PIL reports (width, height)
    np.testing.assert_array_equal(pixels(image), pixels(decoder(CAPTION, seed=0)))


def test_diffusers_decoder_wraps_any_saved_pipeline(
    tiny_sdxl_paths: tuple[str, str], base_only_decoder: SDXLDecoder
) -> None:
    decoder = DiffusersDecoder.from_pretrained(tiny_sdxl_paths[0], num_inference_steps=STEPS)
    assert type(decoder.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert isinstance(decoder, ImageDecoder)
    image = decoder(CAPTION, seed=4)
    assert image.size == (64, 64)
    # Same pipeline, same defaults (guidance 5.0): the generic wrapper matches the SDXL base-only path.
    np.testing.assert_array_equal(pixels(image), pixels(base_only_decoder(CAPTION, seed=4)))


def test_create_image_decoder(tiny_sdxl_paths: tuple[str, str]) -> None:
    import argparse

    from textbind.runtime import DecoderKind, DiffusionOptions, add_image_decoder_arguments, decoder_kind_from_arguments

    base_path, refiner_path = tiny_sdxl_paths
    assert create_image_decoder(DecoderKind.NONE, DiffusionOptions(base=base_path)) is None
    refined = create_image_decoder(DecoderKind.SDXL, DiffusionOptions(base=base_path, refiner=refiner_path, steps=2,
                                                                      high_noise_frac=0.5))
    assert isinstance(refined, SDXLDecoder) and refined.refiner is not None
    base_only = create_image_decoder(DecoderKind.SDXL, DiffusionOptions(base=base_path, steps=2))
    assert isinstance(base_only, SDXLDecoder) and base_only.refiner is None
    with pytest.raises(ValueError, match="needs a base"):
        create_image_decoder(DecoderKind.SDXL, DiffusionOptions(refiner=refiner_path))
    with pytest.raises(ValueError, match="needs the sdxl image decoder"):
        create_image_decoder(DecoderKind.DIFFUSERS, DiffusionOptions(base=base_path, refiner=refiner_path))
    # --image-decoder auto reads the pipeline class in --sd-base: an SDXL base gives the SDXL decoder
    parser = argparse.ArgumentParser()
    add_image_decoder_arguments(parser)
    assert decoder_kind_from_arguments(parser.parse_args(["--sd-base", base_path])) == DecoderKind.SDXL
    assert decoder_kind_from_arguments(parser.parse_args([])) == DecoderKind.NONE


def test_missing_paths_are_named_in_the_error(tmp_path: Path, tiny_sdxl_paths: tuple[str, str]) -> None:
    from textbind.runtime import DiffusionOptions

    missing = tmp_path / "no_such_sdxl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        SDXLDecoder.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        SDXLDecoder.from_pretrained(tiny_sdxl_paths[0], missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        create_image_decoder("sdxl", DiffusionOptions(base=str(missing)))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        DiffusersDecoder.from_pretrained(missing)
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SDXLDecoder.from_pretrained(not_a_pipeline)


def test_invalid_hand_off_is_rejected(tiny_sdxl_paths: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="high_noise_frac"):
        SDXLDecoder.from_pretrained(*tiny_sdxl_paths, high_noise_frac=1.0)


def test_resolve_dtype() -> None:
    assert resolve_dtype("cpu") == torch.float32
    assert resolve_dtype("cuda") == torch.float16
    assert resolve_dtype("cuda:1", "bf16") == torch.bfloat16
    assert resolve_dtype("cuda", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("cpu", "int8")


def test_tiny_sdxl_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    first_base, _ = build_tiny_sdxl(tmp_path / "first", seed=7)
    second_base, _ = build_tiny_sdxl(tmp_path / "second", seed=7)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (Path(first_base) / weights).read_bytes() == (Path(second_base) / weights).read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_on_cuda(tiny_sdxl_paths: tuple[str, str]) -> None:
    decoder = SDXLDecoder.from_pretrained(
        *tiny_sdxl_paths, device="cuda", num_inference_steps=STEPS, high_noise_frac=HIGH_NOISE_FRAC
    )
    assert decoder.base.unet.dtype == torch.float16
    first = pixels(decoder(CAPTION, seed=0))
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, pixels(decoder(CAPTION, seed=0)))
