"""TextBindEval: generate assistant turns of held-out stage-2 conversations from their gold context and score them.

Each conversation of the JSON file gives one item per evaluated assistant turn (`eval.turns=last`:
the last one; `all`: every one), with the gold turns before it as context. Metrics (see
`textbind.eval.metrics` for tokenisation):
- text: BLEU-2 and BLEU-4 (corpus, x100), ROUGE-L F (0..1, mean), BERTScore F1 (0..1, mean; with
  eval.bertscore_model), and the paper's diversity of the generated answers (and of the references);
- images: precision / recall / F1 of "this turn has an image" over all turns; ROUGE-L of each emitted
  caption against the reference caption at the same position; CLIP similarity (with eval.clip_model,
  0..100) of each generated image to the reference caption and to the reference image.
A failed item (unusable input) counts as an empty answer without images.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from textbind.data.conversation import Conversation, DataError, load_image, parse_record, validate_conversation
from textbind.diversity import turn_diversity
from textbind.eval.config import EvalConfig
from textbind.eval.harness import EvalItem, Metric, Scores, file_fingerprint
from textbind.eval.metrics import (
    ClipSimilarity,
    bertscore_f1,
    bleu_from_statistics,
    bleu_statistics,
    bootstrap_interval,
    mean_interval,
    plain_text,
    presence_scores,
    rouge_l,
)
from textbind.generation import DecodingConfig

logger = logging.getLogger(__name__)


def _context(conversation: Conversation, turn_index: int) -> Conversation:
    context = Conversation(conversation.turns[:turn_index], conversation.image_dir,
                           f"{conversation.source} (context of turn {turn_index})")
    validate_conversation(context, for_inference=True)  # DataError names a missing image file
    return context


class TextBindEval:
    name = "textbind"

    def __init__(self, data_path: str, options: EvalConfig) -> None:
        self.path = Path(data_path)
        self.options = options

    def settings(self) -> dict[str, Any]:
        return {"file": file_fingerprint(self.path), "turns": self.options.turns, "image_dir": self.options.image_dir}

    def generation_config(self, config: DecodingConfig) -> DecodingConfig:
        return config

    def items(self) -> list[EvalItem]:
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{self.path}: cannot read a JSON list of conversations ({error})") from error
        if not isinstance(records, list):
            raise DataError(f"{self.path}: expected a JSON list of conversations")
        items = []
        for index, record in enumerate(records):
            try:
                conversation = parse_record(record, f"{self.path} record {index}", self.options.image_dir)
                validate_conversation(conversation, check_files=False)
            except DataError as error:
                items.append(EvalItem(str(index), None, {"record": index}, error=str(error)))
                continue
            assistant = [t for t, turn in enumerate(conversation.turns) if turn.role == "assistant"]
            for turn_index in assistant[-1:] if self.options.turns == "last" else assistant:
                turn = conversation.turns[turn_index]
                reference = {
                    "record": index,
                    "turn": turn_index,
                    "content": turn.content,
                    "images": [str(conversation.image_path(image)) for image in turn.image_list],
                    "captions": list(turn.caption_list[: len(turn.image_list)]),
                }
                items.append(EvalItem(f"{index}:{turn_index}", partial(_context, conversation, turn_index), reference))
        return items

    def score(self, records: list[dict[str, Any]], output_dir: Path) -> Scores:
        seed = self.options.bootstrap_seed
        predictions = [record.get("prediction") or {} for record in records]
        generated = [plain_text(prediction.get("content", "")) for prediction in predictions]
        references = [plain_text(record["reference"].get("content", "")) for record in records]
        metrics: dict[str, Metric] = {}
        item_scores: dict[str, dict[str, float]] = {record["id"]: {} for record in records}
        count = len(records)
        if not count:
            return Scores(metrics)

        for n_gram in (2, 4):
            statistics = bleu_statistics(generated, references, n_gram)
            value = 100 * bleu_from_statistics(statistics.sum(axis=0), n_gram)
            interval = bootstrap_interval(
                statistics, lambda rows, n=n_gram: 100 * bleu_from_statistics(rows.sum(axis=0), n), seed=seed)
            metrics[f"bleu_{n_gram}"] = Metric(value, count, interval)
        rouge = rouge_l(generated, references)
        metrics["rouge_l"] = Metric(float(np.mean(rouge)), count, mean_interval(rouge, seed))
        for record, value in zip(records, rouge, strict=True):
            item_scores[record["id"]]["rouge_l"] = value
        if self.options.bertscore_model:
            f1 = bertscore_f1(generated, references, self.options.bertscore_model, self.options.metrics_device,
                              num_layers=self.options.bertscore_layers or None)
            metrics["bertscore_f1"] = Metric(float(np.mean(f1)), count, mean_interval(f1, seed))
            for record, value in zip(records, f1, strict=True):
                item_scores[record["id"]]["bertscore_f1"] = value

        by_conversation: dict[int, list[tuple[int, str]]] = {}
        references_by_conversation: dict[int, list[tuple[int, str]]] = {}
        for record, text, reference in zip(records, generated, references, strict=True):
            key = record["reference"].get("record", -1)
            by_conversation.setdefault(key, []).append((record["reference"].get("turn", 0), text))
            references_by_conversation.setdefault(key, []).append((record["reference"].get("turn", 0), reference))
        ordered = [[text for _, text in sorted(turns)] for turns in by_conversation.values()]
        ordered_references = [[text for _, text in sorted(turns)] for turns in references_by_conversation.values()]
        metrics["diversity"] = Metric(turn_diversity(ordered), count)
        metrics["reference_diversity"] = Metric(turn_diversity(ordered_references), count)

        has_image = [bool(prediction.get("captions")) for prediction in predictions]
        expects_image = [bool(record["reference"].get("images")) for record in records]
        presence = presence_scores(has_image, expects_image)
        rows = np.array([has_image, expects_image], dtype=bool).T
        f1_interval = bootstrap_interval(rows, lambda r: presence_scores(r[:, 0], r[:, 1])["f1"], seed=seed)
        metrics["image_precision"] = Metric(presence["precision"], sum(has_image))
        metrics["image_recall"] = Metric(presence["recall"], sum(expects_image))
        metrics["image_f1"] = Metric(presence["f1"], count, f1_interval)

        caption_pairs = [(record["id"], generated_caption, reference_caption, k)
                         for record, prediction in zip(records, predictions, strict=True)
                         for k, (generated_caption, reference_caption)
                         in enumerate(zip(prediction.get("captions", []), record["reference"].get("captions", [])))]
        if caption_pairs:
            caption_rouge = rouge_l([p[1] for p in caption_pairs], [p[2] for p in caption_pairs])
            metrics["caption_rouge_l"] = Metric(float(np.mean(caption_rouge)), len(caption_pairs),
                                                mean_interval(caption_rouge, seed))
            _average_into(item_scores, "caption_rouge_l", [p[0] for p in caption_pairs], caption_rouge)
        if self.options.clip_model:
            metrics.update(self._clip_metrics(records, predictions, output_dir, item_scores))
        ranking = self.options.report_metric or ("bertscore_f1" if "bertscore_f1" in metrics else "rouge_l")
        return Scores(metrics, item_scores, {}, ranking)

    def _clip_metrics(self, records: list[dict[str, Any]], predictions: list[dict[str, Any]], output_dir: Path,
                      item_scores: dict[str, dict[str, float]]) -> dict[str, Metric]:
        clip = ClipSimilarity(self.options.clip_model, self.options.metrics_device)
        to_caption: list[tuple[str, float]] = []
        to_image: list[tuple[str, float]] = []
        for record, prediction in zip(records, predictions, strict=True):
            reference = record["reference"]
            for k, image_file in enumerate(prediction.get("images", [])):
                if image_file is None or k >= len(reference.get("images", [])):
                    continue
                try:
                    image = load_image(output_dir / image_file, f"item {record['id']} generated image {k}")
                except DataError as error:
                    logger.warning("%s", error)
                    continue
                if k < len(reference.get("captions", [])) and reference["captions"][k].strip():
                    to_caption.append((record["id"], clip.image_text([image], [reference["captions"][k]])[0]))
                try:
                    reference_image = load_image(reference["images"][k], f"item {record['id']} reference image {k}")
                except DataError as error:
                    logger.warning("%s", error)
                    continue
                to_image.append((record["id"], clip.image_image([image], [reference_image])[0]))
        metrics = {}
        seed = self.options.bootstrap_seed
        for name, pairs in (("clip_image_caption", to_caption), ("clip_image_image", to_image)):
            if pairs:
                values = [value for _, value in pairs]
                metrics[name] = Metric(float(np.mean(values)), len(values), mean_interval(values, seed))
                _average_into(item_scores, name, [item for item, _ in pairs], values)
        return metrics


def _average_into(item_scores: dict[str, dict[str, float]], name: str, item_ids: list[str],
                  values: list[float]) -> None:
    sums: dict[str, list[float]] = {}
    for item_id, value in zip(item_ids, values, strict=True):
        sums.setdefault(item_id, []).append(value)
    for item_id, item_values in sums.items():
        item_scores[item_id][name] = float(np.mean(item_values))


def build_benchmark(data_path: str, options: EvalConfig) -> TextBindEval:
    return TextBindEval(data_path, options)
