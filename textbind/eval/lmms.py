"""textbind as an lmms-eval model: the request -> conversation -> answer adapter, and the plugin's manifest.

lmms-eval (0.7) finds plugin models through the entry-point group `lmms_eval.models`; textbind's
entry point (`textbind = textbind.eval.lmms:manifests`, in setup.py) names the model class
`textbind.eval.lmms_model.TextBindLMMs`, so after `pip install -e .[eval]`:

    lmms-eval --model textbind --model_args config=configs/model/llama2_7b.yaml,checkpoint=...,sd_base=... \
        --tasks mme --batch_size 1

`model_args` are the flags of every textbind command that answers conversations (`textbind.runtime`),
with underscores: config, checkpoint, vision_model, qformer, language_model, processor, device, dtype,
image_decoder, sd_base, sd_refiner, ...; plus output_dir (where generated images go) and the
generation flags (max_new_tokens, seed, max_images). `generate_until` answers with the text; an answer
with images is, as lmms-eval's image-generating models return it, the JSON string
`{"text": ..., "images": [paths of the saved PNG files]}`. This module does not import lmms-eval.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from textbind import IMAGE_TOKEN
from textbind.data.conversation import Conversation, DataError, Turn
from textbind.generation import DecodingConfig

MODEL_ID = "textbind"
MODEL_CLASS_PATH = "textbind.eval.lmms_model.TextBindLMMs"


def manifests() -> list[Any]:
    """The entry point's payload: lmms-eval calls it and registers what it returns."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)]


def conversation_from_request(context: str, visuals: list[Any] | None, source: str) -> Conversation:
    """An lmms-eval prompt and its visuals (PIL images or image paths) -> a one-turn conversation.

    A context with as many `<image>` markers as images keeps them where they are; one without markers
    gets the images in front of the text (as the LLaVA-style models of lmms-eval do); other counts and
    non-image visuals (video, audio) raise DataError.
    """
    images = []
    for visual in visuals or []:
        if isinstance(visual, Image.Image):
            images.append(visual.convert("RGB"))
        elif isinstance(visual, (str, os.PathLike)) and Path(visual).is_file():
            images.append(str(visual))
        else:
            raise DataError(f"{source}: visual {type(visual).__name__} {str(visual)[:80]!r} is not an image")
    markers = context.count(IMAGE_TOKEN)
    if markers == 0 and images:
        context = " ".join([IMAGE_TOKEN] * len(images)) + "\n" + context
    elif markers != len(images):
        raise DataError(f"{source}: {markers} {IMAGE_TOKEN} marker(s) in the prompt but {len(images)} image(s)")
    return Conversation([Turn("user", context, images)], source=source)


def generation_config_for(base: DecodingConfig, gen_kwargs: dict[str, Any] | None) -> DecodingConfig:
    """lmms-eval's generation kwargs over the model's defaults (temperature 0 or do_sample False: greedy)."""
    gen_kwargs = gen_kwargs or {}
    config = base
    if gen_kwargs.get("max_new_tokens"):
        config = replace(config, max_new_tokens=int(gen_kwargs["max_new_tokens"]))
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    do_sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
    config = replace(config, do_sample=do_sample, temperature=temperature if do_sample else config.temperature)
    if gen_kwargs.get("top_p") is not None and do_sample:
        config = replace(config, top_p=float(gen_kwargs["top_p"]))
    return config.validate()


def cut_at_stop(text: str, until: Any) -> str:
    """The text up to the first of lmms-eval's stop strings (`until`: a string or a list)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


class LmmsAnswerer:
    """Answers lmms-eval requests with an InterleavedGenerator; generated images are saved under output_dir."""

    def __init__(self, generator: Any, config: DecodingConfig, output_dir: str | os.PathLike) -> None:
        self.generator = generator
        self.config = config
        self.output_dir = Path(output_dir)

    def answer(self, context: str, visuals: list[Any] | None, gen_kwargs: dict[str, Any] | None, name: str) -> str:
        conversation = conversation_from_request(context, visuals, name)
        turn = self.generator.generate_turn(conversation, generation_config_for(self.config, gen_kwargs))
        text = cut_at_stop(turn.content, (gen_kwargs or {}).get("until"))
        if not turn.caption_list:
            return text.strip()
        paths = []
        for number, image in enumerate(turn.image_list):
            if image is None:
                continue
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}_{number}.png"
            image.save(path)
            paths.append(str(path.resolve()))
        text = re.sub(r"\s+", " ", text.replace(IMAGE_TOKEN, " ")).strip()
        return json.dumps({"text": text, "images": paths, "captions": list(turn.caption_list)}, ensure_ascii=False)
