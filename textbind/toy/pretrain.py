"""Pretrain the toy world's vision encoder and Q-Former, and its language model (the toy BLIP-2 and Llama-2).

The real recipe starts from a BLIP-2 encoder that already sees. The toy one starts random, and
learning to see only through the language model's caption loss is slow on a CPU: shape, the last
attribute to be learned, takes ~900 steps even with direct supervision. So, as a vision encoder is
pretrained on labelled images before it meets a language model, this step trains the encoder and
the Q-Former with linear attribute heads (the layout, then each object slot's colour, shape and
size) on fresh images drawn from their own random stream -- never the stage-1, stage-2 or held-out
evaluation images -- and writes them back in the BLIP-2 layout (``MODEL_DIR/blip2_vision_model/``,
``MODEL_DIR/blip2_qformer.safetensors``). The heads are dropped; stage 1 then aligns the encoder
with the language model exactly as in the real recipe.

The language model gets the same kind of start (``pretrain_language``): a few hundred steps on
toy-world text, in a second process while the vision part trains (on a 2-core machine the second
core would idle otherwise). Each part starts on half of the threads; the one that finishes first
leaves its half to the other (the language part runs 1.9x faster on two threads than on one).

    textbind toy pretrain --model-dir checkpoint/toy --steps 1500 --language-steps 450
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoModelForCausalLM, Blip2QFormerModel, Blip2VisionModel

from textbind import IGNORE_INDEX
from textbind.data.conversation import parse_record
from textbind.data.sequence import LLAMA2, ConversationEncoder
from textbind.model.builder import load_qformer, load_tokenizer, resize_embeddings_for_special_tokens
from textbind.model.mim import query_image
from textbind.prepare_blip2 import save_qformer_file
from textbind.toy.datagen import Mixture, stream_rng, text_records
from textbind.toy.world import COLOURS, LAYOUTS, SHAPES, SIZES, Scene, draw_scene, random_scene

logger = logging.getLogger(__name__)

PRETRAIN_STREAM = "pretrain"
CHECK_STREAM = "pretrain-check"
LANGUAGE_STREAM = "pretrain-language"
LANGUAGE_CHECK_STREAM = "pretrain-language-check"
REPORT_FILE = "pretrain.json"
LANGUAGE_REPORT_FILE = "pretrain_language.json"
DEFAULT_STEPS = 1500
DEFAULT_LANGUAGE_STEPS = 450  # ends about when the vision part's 1500 steps do, on one core and then on both
# The language pretraining's text leans on drawing and editing (what takes longest to learn): drawings with
# one to three edits make up most of it; descriptions, questions and comparisons the rest.
LANGUAGE_MIXTURE = Mixture(segment_weights=(1.0, 1.0, 0.5, 6.0), edit_count_weights=(1.0, 3.0, 3.0, 3.0))
PARTS = ("vision", "language", "both")
_COLOURS, _SHAPES, _SIZES = list(COLOURS), list(SHAPES), list(SIZES)
# What the heads predict; a single-object scene's second slot takes each attribute's extra "none" class.
TARGETS: tuple[tuple[str, int], ...] = (
    ("layout", len(LAYOUTS)),
    ("colour_1", len(_COLOURS)),
    ("shape_1", len(_SHAPES)),
    ("size_1", len(_SIZES)),
    ("colour_2", len(_COLOURS) + 1),
    ("shape_2", len(_SHAPES) + 1),
    ("size_2", len(_SIZES) + 1),
)


def scene_labels(scene: Scene) -> list[int]:
    """The class index of every target of TARGETS for ``scene``."""
    first = scene.objects[0]
    labels = [LAYOUTS.index(scene.layout), _COLOURS.index(first.colour), _SHAPES.index(first.shape),
              _SIZES.index(first.size)]
    if len(scene.objects) == 2:
        second = scene.objects[1]
        return labels + [_COLOURS.index(second.colour), _SHAPES.index(second.shape), _SIZES.index(second.size)]
    return labels + [len(_COLOURS), len(_SHAPES), len(_SIZES)]


class SceneEncoder(nn.Module):
    """Vision encoder -> Q-Former (as MIMModel.encode_images, without the projection) -> attribute logits."""

    def __init__(self, vision_model: Blip2VisionModel, qformer: Blip2QFormerModel, query_tokens: torch.Tensor):
        super().__init__()
        self.vision_model = vision_model
        self.qformer = qformer
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        features = query_tokens.shape[1] * query_tokens.shape[2]
        self.heads = nn.ModuleList(nn.Linear(features, classes) for _, classes in TARGETS)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        image_features = self.vision_model(pixel_values=pixel_values).last_hidden_state
        flat = query_image(self.qformer, self.query_tokens, image_features).flatten(1)
        return [head(flat) for head in self.heads]


def scene_batch(rng: random.Random, size: int, image_processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random scenes drawn with jitter: (pixels, (size, len(TARGETS)) labels)."""
    scenes = [random_scene(rng) for _ in range(size)]
    images = [draw_scene(scene, rng=rng) for scene in scenes]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor([scene_labels(scene) for scene in scenes])


@torch.no_grad()
def attribute_accuracy(encoder: SceneEncoder, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share of images whose every target is right (``all``) and the accuracy of each target."""
    was_training = encoder.training
    encoder.eval()
    right = torch.stack([logits.argmax(-1) == labels[:, index] for index, logits in enumerate(encoder(pixels))], 1)
    encoder.train(was_training)
    accuracy = {name: round(right[:, index].float().mean().item(), 4) for index, (name, _) in enumerate(TARGETS)}
    return {"all": round(right.all(1).float().mean().item(), 4), **accuracy}


def _train(module: nn.Module, optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int,
           min_lr_ratio: float, step_loss: Callable[[], torch.Tensor], description: str, progress: bool,
           threads_wanted: Callable[[], int] | None = None) -> float:
    """``steps`` optimizer steps on ``step_loss()`` (clipped at norm 1, on a cosine schedule with warmup); the
    seconds taken.

    ``threads_wanted``, asked before every step, may raise the number of threads (when the other part of
    ``--part both`` has finished and left its cores free); it never lowers them.
    """
    from textbind.optim import cosine_schedule

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(warmup_steps, steps, min_lr_ratio))
    started = time.perf_counter()
    bar = tqdm(range(steps), desc=description, disable=not progress, mininterval=2.0)
    for _ in bar:
        if threads_wanted is not None and (wanted := threads_wanted()) > torch.get_num_threads():
            torch.set_num_threads(wanted)
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return time.perf_counter() - started


def _run_report(steps: int, batch_size: int, lr: float, seed: int, seconds: float) -> dict[str, Any]:
    """What both parts' reports open with: the run's settings, its time and the threads it ended on."""
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(seconds, 1),
            "threads_at_end": torch.get_num_threads()}


def pretrain_vision(
    model_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    min_lr_ratio: float = 0.1,
    seed: int = 0,
    check_images: int = 500,
    progress: bool = True,
    threads_wanted: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Pretrain ``model_dir``'s vision encoder + Q-Former in place; return (and save) a report.

    ``threads_wanted``: see ``_train``."""
    model_dir = Path(model_dir)
    vision_dir, qformer_file = model_dir / "blip2_vision_model", model_dir / "blip2_qformer.safetensors"
    for path in (vision_dir, qformer_file, model_dir / "processor"):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; build the toy model first (python -m textbind.toy.build)")
    torch.manual_seed(seed)
    image_processor = AutoImageProcessor.from_pretrained(str(model_dir / "processor"), local_files_only=True)
    vision_model = Blip2VisionModel.from_pretrained(str(vision_dir), local_files_only=True)
    qformer, query_tokens = load_qformer(str(qformer_file))
    encoder = SceneEncoder(vision_model, qformer, query_tokens).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.001)
    rng = stream_rng(seed, PRETRAIN_STREAM)
    check_pixels, check_labels = scene_batch(stream_rng(seed, CHECK_STREAM), check_images, image_processor)

    def step_loss() -> torch.Tensor:
        pixels, labels = scene_batch(rng, batch_size, image_processor)
        logits = encoder(pixels)
        return sum(nn.functional.cross_entropy(item, labels[:, index]) for index, item in enumerate(logits))

    seconds = _train(encoder, optimizer, steps, warmup_steps, min_lr_ratio, step_loss, "pretrain vision", progress,
                     threads_wanted)

    report = {
        **_run_report(steps, batch_size, lr, seed, seconds),
        "check_images": check_images,
        "check_accuracy": attribute_accuracy(encoder, check_pixels, check_labels),
    }
    _save(encoder, vision_dir, qformer_file)
    (model_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("pretrained the toy vision encoder in %.0f s: %s", seconds, report["check_accuracy"])
    return report


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(labels)] = torch.tensor(labels)
    return input_ids, targets


def _pad_id(encoder: ConversationEncoder) -> int:
    pad = encoder.tokenizer.pad_token_id
    return pad if pad is not None else encoder.eos_token_id


def text_batch(rng: random.Random, size: int, encoder: ConversationEncoder,
               mixture: Mixture | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` fresh toy conversations as text, right-padded: (input_ids, targets)."""
    return next(text_batches(rng, size, encoder, mixture, pool=1))


def text_batches(rng: random.Random, size: int, encoder: ConversationEncoder, mixture: Mixture | None = None,
                 pool: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``size`` fresh toy conversations without end; each ``pool`` batches are made of conversations
    of like length (sorted, then the batches shuffled), so that little of a step is padding."""
    while True:
        rows = [encoder.encode_as_text(parse_record(record, "pretraining text"))
                for record in text_records(rng, size * pool, mixture)]
        rows.sort(key=lambda row: len(row[0]))
        batches = [rows[start : start + size] for start in range(0, len(rows), size)]
        rng.shuffle(batches)
        for batch in batches:
            yield _padded(batch, _pad_id(encoder))


@torch.no_grad()
def text_accuracy(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, start_id: int,
                  end_id: int) -> dict[str, float]:
    """Teacher-forced next-token accuracy on the supervised tokens (``tokens``), on the tokens of the images'
    captions (``captions``), and the share of captions right in every token (``whole_captions``)."""
    was_training = model.training
    model.eval()
    predicted = model(input_ids=input_ids).logits.argmax(-1)
    model.train(was_training)
    supervised = targets != IGNORE_INDEX
    right = (predicted == targets) & supervised
    # A caption's tokens: from the prediction of its first word (after <start>) to that of <end>.
    in_caption = torch.zeros_like(supervised)
    caption_right, captions = 0, 0
    for row in range(input_ids.shape[0]):
        inside, all_right = False, True
        for position in range(input_ids.shape[1]):
            if input_ids[row, position] == start_id and supervised[row, position]:
                inside, all_right = True, True
            if inside:
                in_caption[row, position] = True
                all_right &= bool(right[row, position])
                if targets[row, position] == end_id:
                    inside = False
                    captions += 1
                    caption_right += all_right
    return {
        "tokens": round(right.sum().item() / max(1, supervised.sum().item()), 4),
        "captions": round((right & in_caption).sum().item() / max(1, in_caption.sum().item()), 4),
        "whole_captions": round(caption_right / max(1, captions), 4),
    }


def pretrain_language(
    model_dir: str | Path,
    steps: int = DEFAULT_LANGUAGE_STEPS,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    min_lr_ratio: float = 0.1,
    seed: int = 0,
    check_conversations: int = 300,
    progress: bool = True,
    threads_wanted: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Pretrain ``model_dir``'s language model in place on toy-world text; return (and save) a report.

    The real recipe starts from Llama-2, which already knows its language. The toy one starts random, so
    it first reads fresh conversations of the toy world's grammar (the synthetic writer's, from their own
    random stream), each image written as its caption between ``<start>`` and ``<end>`` -- what the model
    writes at inference before a drawn image takes the caption's place -- with the loss on the assistant's
    words, as in stage 2. ``threads_wanted``: see ``_train``.
    """
    model_dir = Path(model_dir)
    llm_dir = model_dir / "llama"
    if not (llm_dir / "config.json").exists():
        raise FileNotFoundError(f"{llm_dir}: missing; build the toy model first (python -m textbind.toy.build)")
    torch.manual_seed(seed)
    # With <image>, <start> and <end>, as the model builder adds them; saved with the model below.
    tokenizer = load_tokenizer(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llm_dir), local_files_only=True).train()
    resize_embeddings_for_special_tokens(model, len(tokenizer))
    encoder = ConversationEncoder(tokenizer, num_query_tokens=1, template=LLAMA2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.001)
    rng = stream_rng(seed, LANGUAGE_STREAM)
    check_ids, check_targets = text_batch(stream_rng(seed, LANGUAGE_CHECK_STREAM), check_conversations, encoder,
                                          LANGUAGE_MIXTURE)

    batches = text_batches(rng, batch_size, encoder, LANGUAGE_MIXTURE)

    def step_loss() -> torch.Tensor:
        input_ids, targets = next(batches)
        logits = model(input_ids=input_ids).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    seconds = _train(model, optimizer, steps, warmup_steps, min_lr_ratio, step_loss, "pretrain language",
                     progress, threads_wanted)

    report = {
        **_run_report(steps, batch_size, lr, seed, seconds),
        "check_conversations": check_conversations,
        "check_accuracy": text_accuracy(model, check_ids, check_targets, encoder.start_token_id,
                                        encoder.end_token_id),
    }
    staging = llm_dir.with_name(llm_dir.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    for path in sorted(staging.iterdir()):  # replaced file by file
        os.replace(path, llm_dir / path.name)
    staging.rmdir()
    (model_dir / LANGUAGE_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("pretrained the toy language model in %.0f s: %s", seconds, report["check_accuracy"])
    return report


def _save(encoder: SceneEncoder, vision_dir: Path, qformer_file: Path) -> None:
    """Write both parts next to the old ones, then swap them in (an interrupted save leaves the old set)."""
    staging = vision_dir.with_name(vision_dir.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    encoder.vision_model.save_pretrained(str(staging))
    qformer_state = {f"qformer.{key}": value for key, value in encoder.qformer.state_dict().items()}
    qformer_state["query_tokens"] = encoder.query_tokens.data
    staged_qformer = qformer_file.with_name(qformer_file.name + ".new")
    save_qformer_file(staged_qformer, qformer_state, encoder.qformer.config.to_diff_dict())
    shutil.rmtree(vision_dir)
    os.replace(staging, vision_dir)
    os.replace(staged_qformer, qformer_file)


def _half_the_cores() -> int:
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2))


_vision_done: Any = None  # in the language worker: an Event set once the vision part has finished


def _remember_vision_done(event: Any) -> None:
    global _vision_done
    _vision_done = event


def _pretrain_language_quietly(kwargs: dict[str, Any], threads: int, all_threads: int) -> dict[str, Any]:
    """``pretrain_language`` in a worker process (no second progress bar on the terminal), on ``threads``
    threads until the vision part has finished, then on ``all_threads``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(threads)
    done = _vision_done
    return pretrain_language(**kwargs, progress=False,
                             threads_wanted=lambda: all_threads if done is not None and done.is_set() else threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="checkpoint/toy", help="built by python -m textbind.toy.build")
    parser.add_argument("--part", choices=PARTS, default="both",
                        help="what to pretrain; both: the language model in a second process, beside the vision part")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="vision pretraining steps")
    parser.add_argument("--language-steps", type=int, default=DEFAULT_LANGUAGE_STEPS,
                        help="language pretraining steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.steps < 1 or args.language_steps < 1:
        parser.error("--steps and --language-steps must be positive")
    language = {"model_dir": args.model_dir, "steps": args.language_steps, "batch_size": args.batch_size,
                "lr": args.lr, "seed": args.seed}
    results = {}
    if args.part == "language":
        results["language"] = pretrain_language(**language)["check_accuracy"]
    elif args.part == "vision":
        results["vision"] = pretrain_vision(args.model_dir, args.steps, args.batch_size, args.lr,
                                            seed=args.seed)["check_accuracy"]
    else:  # each part on half of the threads; the part that finishes first leaves its half to the other
        threads_before = torch.get_num_threads()
        threads = _half_the_cores()
        all_threads = min(2 * threads, os.cpu_count() or 2)  # both halves
        torch.set_num_threads(threads)
        context = multiprocessing.get_context("spawn")
        vision_done = context.Event()
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_remember_vision_done,
                                     initargs=(vision_done,)) as pool:
                pending = pool.submit(_pretrain_language_quietly, language, threads, all_threads)
                try:
                    results["vision"] = pretrain_vision(
                        args.model_dir, args.steps, args.batch_size, args.lr, seed=args.seed,
                        threads_wanted=lambda: all_threads if pending.done() else threads)["check_accuracy"]
                finally:
                    vision_done.set()
                results["language"] = pending.result()["check_accuracy"]
        finally:
            torch.set_num_threads(threads_before)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
