"""A tiny random SDXL base + refiner pair, built from configs and saved like the real checkpoints."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Sizes are chosen so that every component is a few hundred kB and one denoising step takes milliseconds.
TEXT_HIDDEN_SIZE = 32  # both CLIP text encoders; the base UNet attends over both, concatenated (64)
TEXT_PROJECTION_SIZE = 32  # pooled text embedding of text_encoder_2, fed to the UNet's add-embedding
ADDITION_TIME_EMBED_SIZE = 8  # per micro-conditioning number (original size, crop, target size / aesthetics)
LATENT_SIZE = 32  # the VAE downsamples by 2 (two blocks), so images are 64x64
MAX_TOKENS = 77  # as in CLIP; the pipelines pad every prompt to the tokenizer's model_max_length

BEGIN_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# A handful of English merges so that the tokenizer is a real (if small) BPE, not only bytes.
MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("a", "t</w>"),
    ("o", "f</w>"),
]


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2 / CLIP): every byte maps to one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write a small CLIP vocab.json + merges.txt (specials, 256 bytes, their word-final forms, MERGES)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = [BEGIN_TOKEN, END_TOKEN]
    alphabet = sorted(_byte_to_unicode().values())
    tokens += alphabet + [character + "</w>" for character in alphabet]
    tokens += ["".join(pair) for pair in MERGES]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in MERGES)
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    return directory


def _build_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as directory:
        write_clip_tokenizer_files(directory)
        return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TOKENS, local_files_only=True)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state, so at least two layers
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_PROJECTION_SIZE,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        # The pooled output is read at the first end token; CLIP pads with that same token.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _unet(cross_attention_dim: int, number_of_time_ids: int) -> UNet2DConditionModel:
    """An SDXL-style UNet: the base conditions on 6 time ids, the refiner on 5 (aesthetics, no target)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_SIZE,
        projection_class_embeddings_input_dim=number_of_time_ids * ADDITION_TIME_EMBED_SIZE
        + TEXT_PROJECTION_SIZE,
    )


def _scheduler() -> EulerDiscreteScheduler:
    """The scheduler configuration SDXL base 1.0 ships with."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> tuple[str, str]:
    """Build and save a tiny random SDXL base and refiner; return (base_path, refiner_path).

    Like the released checkpoints, the refiner has no first text encoder, scores aesthetics in its
    micro-conditioning, and holds the same `text_encoder_2` and VAE weights as the base. Weights
    depend only on `seed`; the global torch RNG is left as it was.
    """
    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer()
    text_config = _text_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            norm_num_groups=8,
            latent_channels=4,
            sample_size=2 * LATENT_SIZE,
            scaling_factor=0.13025,  # SDXL's VAE scaling
        )
        base_unet = _unet(cross_attention_dim=2 * TEXT_HIDDEN_SIZE, number_of_time_ids=6)
        refiner_unet = _unet(cross_attention_dim=TEXT_HIDDEN_SIZE, number_of_time_ids=5)

    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=base_unet,
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=refiner_unet,
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        add_watermarker=False,
    )
    base_path = out_dir / "sdxl_base"
    refiner_path = out_dir / "sdxl_refiner"
    base.save_pretrained(base_path)
    refiner.save_pretrained(refiner_path)
    return str(base_path), str(refiner_path)
