"""Step 1: embed every pair (its image, or its caption) with a local encoder, cached on disk per source.

    textbind datagen embed --config configs/datagen/default.yaml pairs.path=... [key=value ...]

Encoders: the model's own BLIP-2 vision encoder (pooled output; `embed.encoder=blip2`), any CLIP or
SigLIP directory through transformers (`clip`, `siglip`; images or captions), or a hashing bag of
caption n-grams that needs no model (`hashing`). Vectors are L2-normalised, so a dot product is a
cosine similarity.

Cache: OUTPUT_DIR/embeddings/<source>-<hash>.npy (vectors) + .json (the usable pairs, the skip report),
the hash covering the source file (path, size, mtime) and the encoder. The .json is written last, so a
run killed half-way leaves no entry that looks complete; a rerun embeds only sources without one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from textbind.data.conversation import DataError
from textbind.datagen.config import DatagenConfig, EmbedConfig, config_from_arguments, step_parser
from textbind.datagen.pairs import Pair, PairItem, ReadReport, Source, list_sources, load_image, read_source
from textbind.datagen.report import update_report
from textbind.io import atomic_write_json

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"


class Encoder:
    """Turns images or captions into L2-normalised float32 vectors (N, D)."""

    signature: str = ""
    modality: str = "image"

    def encode(self, inputs: list[Any]) -> np.ndarray:
        raise NotImplementedError


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _features(output: Any) -> Any:
    """A features tensor from what get_image_features / get_text_features returned (a tensor or an output)."""
    if hasattr(output, "shape"):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find features in {type(output).__name__}")


class TransformersEncoder(Encoder):
    """BLIP-2 vision encoder (pooled), or CLIP / SigLIP (image or text tower), from a local directory."""

    def __init__(self, config: EmbedConfig) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, Blip2VisionModel

        from textbind.config import torch_dtype

        if not config.model_path or not Path(config.model_path).exists():
            raise DataError(f"embed.model_path: encoder directory not found: {config.model_path!r}")
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if config.dtype == "auto":
            self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = torch_dtype(config.dtype)
        self.kind = config.encoder
        self.modality = config.modality
        loader = Blip2VisionModel if config.encoder == "blip2" else AutoModel
        self.model = loader.from_pretrained(config.model_path, dtype=self.dtype, local_files_only=True)
        self.model.to(self.device).eval()
        if self.modality == "image":
            self.processor = AutoImageProcessor.from_pretrained(config.processor_path or config.model_path,
                                                                local_files_only=True)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(config.processor_path or config.model_path,
                                                           local_files_only=True)
        self.signature = encoder_signature(config)

    def encode(self, inputs: list[Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.modality == "image":
                pixel_values = self.processor(images=inputs, return_tensors="pt")["pixel_values"]
                pixel_values = pixel_values.to(self.device, self.dtype)  # (B, 3, H, W)
                if self.kind == "blip2":
                    features = self.model(pixel_values=pixel_values).pooler_output  # (B, D): the [CLS] token
                else:
                    features = _features(self.model.get_image_features(pixel_values=pixel_values))
            else:
                # SigLIP was trained on max-length padding; CLIP does not mind it.
                tokens = self.tokenizer(inputs, padding="max_length", truncation=True, return_tensors="pt")
                tokens = {key: value.to(self.device) for key, value in tokens.items()}
                features = _features(self.model.get_text_features(**tokens))
        return _normalise(features.float().cpu().numpy())


class HashingEncoder(Encoder):
    """Captions as hashed bags of words and word pairs: no model, stateless, so cacheable per source."""

    def __init__(self, config: EmbedConfig) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.modality = "caption"
        self.vectorizer = HashingVectorizer(n_features=config.hashing_features, alternate_sign=False,
                                            ngram_range=(1, 2), norm="l2")
        self.signature = encoder_signature(config)

    def encode(self, inputs: list[Any]) -> np.ndarray:
        return _normalise(self.vectorizer.transform(inputs).toarray())


def build_encoder(config: EmbedConfig) -> Encoder:
    if config.encoder == "hashing":
        return HashingEncoder(config)
    return TransformersEncoder(config)


def encoder_signature(config: EmbedConfig) -> str:
    """What the cache key needs to know about the encoder, without loading it."""
    if config.encoder == "hashing":
        return f"hashing|{config.hashing_features}"
    processor = config.processor_path or config.model_path
    return "|".join([config.encoder, config.modality, os.path.abspath(config.model_path),
                     os.path.abspath(processor), config.dtype])


@dataclass
class SourceEmbeddings:
    """The usable pairs of one source and their vectors, row for row."""

    source: Source
    pairs: list[Pair]
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    report: ReadReport
    cached: bool = False


def cache_paths(output_dir: str, source: Source, config: EmbedConfig) -> tuple[Path, Path]:
    # "pairs-v2": cached pairs carry their group; a cache written before groups were read is not reused.
    digest = hashlib.sha256(f"{source.fingerprint()}|{encoder_signature(config)}|pairs-v2".encode()).hexdigest()[:16]
    stem = Path(output_dir) / EMBEDDINGS_DIR / f"{source.name}-{digest}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _load_cached(source: Source, vectors_path: Path, metadata_path: Path) -> SourceEmbeddings:
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    pairs = [Pair(**values) for values in metadata["pairs"]]
    vectors = np.load(vectors_path)
    if len(vectors) != len(pairs):
        raise DataError(f"{metadata_path}: {len(pairs)} pairs but {len(vectors)} vectors; delete it to re-embed")
    return SourceEmbeddings(source, pairs, vectors, ReadReport.from_dict(metadata["report"]), cached=True)


def _batches(items: Iterator[PairItem], size: int) -> Iterator[list[PairItem]]:
    batch: list[PairItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _embed_source(source: Source, encoder: Encoder, config: EmbedConfig, decoders: ThreadPoolExecutor,
                  progress: tqdm) -> tuple[list[Pair], np.ndarray, ReadReport]:
    report = ReadReport()
    pairs: list[Pair] = []
    chunks: list[np.ndarray] = []
    try:
        for batch in _batches(read_source(source, report), config.batch_size):
            # Decoding is checked for every image, also when captions are embedded: an unreadable image
            # would only fail later, in the conversation that uses it.
            images = list(decoders.map(_try_load, batch))
            usable = [(item, image) for item, image in zip(batch, images) if not isinstance(image, DataError)]
            for image in images:
                if isinstance(image, DataError):
                    report.skip("unreadable_image", str(image))
            if usable:
                inputs = [image if encoder.modality == "image" else item.pair.caption for item, image in usable]
                chunks.append(encoder.encode(inputs))
                pairs += [item.pair for item, _ in usable]
            progress.update(len(batch))
    except DataError as error:  # an unreadable record file: skipped as a whole, named
        report.skip("unreadable_file", str(error))
    report.usable = len(pairs)
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    return pairs, vectors, report


def _try_load(item: PairItem) -> Any:
    try:
        return load_image(item)
    except DataError as error:
        return error


def embed_pairs(config: DatagenConfig) -> list[SourceEmbeddings]:
    """Embeddings of every source of `pairs.path`, from the cache where it has them."""
    sources = list_sources(config.pairs)
    results: list[SourceEmbeddings] = []
    encoder: Encoder | None = None
    progress: tqdm | None = None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as decoders:
        for source in sources:
            vectors_path, metadata_path = cache_paths(config.run.output_dir, source, config.embed)
            if metadata_path.is_file() and vectors_path.is_file():
                results.append(_load_cached(source, vectors_path, metadata_path))
                continue
            if encoder is None:
                encoder = build_encoder(config.embed)
                progress = tqdm(desc="embedding", unit="pair", disable=not config.run.progress)
            pairs, vectors, report = _embed_source(source, encoder, config.embed, decoders, progress)
            vectors_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = vectors_path.with_name(vectors_path.stem + ".tmp.npy")
            np.save(temporary, vectors)
            os.replace(temporary, vectors_path)
            atomic_write_json(metadata_path, {"source": source.path, "encoder": encoder.signature,
                                       "pairs": [asdict(pair) for pair in pairs], "report": report.to_dict()})
            results.append(SourceEmbeddings(source, pairs, vectors, report))
    if progress is not None:
        progress.close()
    return results


def summarize(results: list[SourceEmbeddings]) -> dict:
    """The embed step's section of report.json."""
    total = ReadReport()
    for result in results:
        total.merge(result.report)
    summary = total.to_dict()
    summary.update({
        "sources": len(results),
        "sources_embedded": sum(1 for result in results if not result.cached),
        "sources_cached": sum(1 for result in results if result.cached),
        "pairs_embedded": sum(len(result.pairs) for result in results if not result.cached),
        "dimension": next((int(result.vectors.shape[1]) for result in results if len(result.pairs)), 0),
    })
    return summary


def run_embed(config: DatagenConfig) -> list[SourceEmbeddings]:
    results = embed_pairs(config)
    summary = summarize(results)
    update_report(config.run.output_dir, "embed", summary)
    logger.info("embedded %d pair(s) from %d source(s) (%d cached); skipped %d: %s", summary["usable"],
                summary["sources"], summary["sources_cached"], summary["skipped_total"], summary["skipped"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = step_parser("textbind datagen embed", "Embed the images (or captions) of the pairs, cached per source.")
    config = config_from_arguments(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = summarize(run_embed(config))
    print(json.dumps({key: value for key, value in summary.items() if key != "skipped_examples"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
