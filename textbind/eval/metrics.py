"""Metrics of generated turns: BLEU, ROUGE-L, BERTScore, image presence, CLIP similarity, bootstrap intervals.

Tokenisation (so that numbers compare across papers):
- BLEU: torchmetrics' SacreBLEU implementation with the `13a` tokenizer (the WMT default: punctuation
  split off words), lower-cased, corpus level (n-gram counts summed over all items, then one BLEU),
  no smoothing; reported x100. Per-item statistics come from the library; the corpus combination
  (brevity penalty x geometric mean of the n-gram precisions) is done here so that bootstrap resamples
  cost nothing, and a test checks it equals torchmetrics' corpus value.
- ROUGE-L: torchmetrics (the `rouge-score` package's rules: lower-cased, non-alphanumerics to spaces,
  whitespace split, no stemming); the F-measure per item, averaged.
- BERTScore: torchmetrics with the model at a local path (no idf, no baseline rescaling), F1 per item.
`<image>` markers are removed from both texts before any text metric.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from textbind import IMAGE_TOKEN

BOOTSTRAP_RESAMPLES = 1000


def plain_text(content: str) -> str:
    """Turn content without its `<image>` markers, whitespace collapsed."""
    return re.sub(r"\s+", " ", content.replace(IMAGE_TOKEN, " ")).strip()


# --- BLEU ------------------------------------------------------------------------------------------------


def bleu_statistics(predictions: Sequence[str], references: Sequence[str], n_gram: int = 4) -> np.ndarray:
    """(N, 2 n_gram + 2) per-item sufficient statistics: matched n-grams (n = 1..n_gram), predicted n-grams,
    prediction length, reference length; from torchmetrics' SacreBLEU (13a tokens, lower-cased)."""
    from torchmetrics.text import SacreBLEUScore

    metric = SacreBLEUScore(n_gram=n_gram, tokenize="13a", lowercase=True)
    rows = []
    for prediction, reference in zip(predictions, references, strict=True):
        metric.reset()
        metric.update([prediction], [[reference]])
        rows.append(torch.cat([metric.numerator, metric.denominator, metric.preds_len.view(1),
                               metric.target_len.view(1)]).double().numpy())
    return np.stack(rows) if rows else np.zeros((0, 2 * n_gram + 2))


def bleu_from_statistics(statistics: np.ndarray, n_gram: int) -> float:
    """Corpus BLEU (0..1) of summed statistics (the rows of `bleu_statistics`, summed over items)."""
    matched, total = statistics[:n_gram], statistics[n_gram : 2 * n_gram]
    prediction_length, reference_length = statistics[2 * n_gram], statistics[2 * n_gram + 1]
    if prediction_length == 0 or np.any(matched == 0):
        return 0.0
    log_precision = float(np.mean(np.log(matched / total)))
    brevity = 1.0 if prediction_length > reference_length else math.exp(1.0 - reference_length / prediction_length)
    return brevity * math.exp(log_precision)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], n_gram: int = 4) -> float:
    return bleu_from_statistics(bleu_statistics(predictions, references, n_gram).sum(axis=0), n_gram)


# --- ROUGE-L, BERTScore ------------------------------------------------------------------------------------


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure (0..1) of each prediction against its reference."""
    from torchmetrics.functional.text.rouge import rouge_score

    scores = []
    for prediction, reference in zip(predictions, references, strict=True):
        if not prediction.strip() or not reference.strip():
            scores.append(0.0)  # nothing to compare (a failed item has no answer): no credit
            continue
        scores.append(float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"]))
    return scores


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], model_path: str, device: str = "cpu",
                 num_layers: int | None = None, batch_size: int = 32) -> list[float]:
    """BERTScore F1 of each prediction against its reference, with the BERT-style model at `model_path`."""
    from torchmetrics.functional.text.bert import bert_score

    if not predictions:
        return []
    # An empty text has no token embeddings; BERTScore gives it 0.
    pairs = [(p or ".", r or ".") for p, r in zip(predictions, references, strict=True)]
    result = bert_score([p for p, _ in pairs], [r for _, r in pairs], model_name_or_path=model_path,
                        num_layers=num_layers, device=device, batch_size=batch_size, truncation=True)
    f1 = result["f1"]
    values = f1.tolist() if isinstance(f1, torch.Tensor) else list(f1)
    return [0.0 if not p.strip() or not r.strip() else float(v)
            for v, p, r in zip(values, predictions, references, strict=True)]


# --- Images -----------------------------------------------------------------------------------------------


def presence_scores(predicted: Sequence[bool], expected: Sequence[bool]) -> dict[str, float]:
    """Precision, recall and F1 of "this turn has an image" (0 where undefined)."""
    true_positive = sum(p and e for p, e in zip(predicted, expected, strict=True))
    predicted_positive, expected_positive = sum(predicted), sum(expected)
    precision = true_positive / predicted_positive if predicted_positive else 0.0
    recall = true_positive / expected_positive if expected_positive else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class ClipSimilarity:
    """CLIP similarity (CLIPScore's scale: 100 x max(cosine, 0)) of images to texts and to images.

    The model and its processor come from a local directory (`CLIPModel.save_pretrained` layout).
    """

    def __init__(self, model_path: str, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model_path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path)

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length)
        return self._features(self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)))

    def image_text(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Similarity of each image to its text."""
        if not images:
            return []
        cosine = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(dim=-1)
        return (100 * cosine.clamp(min=0)).tolist()

    def image_image(self, images: Sequence[Image.Image], others: Sequence[Image.Image]) -> list[float]:
        """Similarity of each image to its counterpart."""
        if not images:
            return []
        cosine = (self.image_embeddings(images) * self.image_embeddings(others)).sum(dim=-1)
        return (100 * cosine.clamp(min=0)).tolist()


# --- Confidence intervals ------------------------------------------------------------------------------------


def bootstrap_interval(
    data: np.ndarray, statistic: Callable[[np.ndarray], float], *, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic` over the rows of `data` (items resampled with replacement)."""
    if len(data) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(data[rng.integers(0, len(data), len(data))]) for _ in range(resamples)]
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def mean_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap interval of a mean (vectorised: one draw matrix)."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), (BOOTSTRAP_RESAMPLES, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
