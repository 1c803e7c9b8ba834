"""Step 2: cluster the embedded pairs into topics (scikit-learn k-means) and drop near-duplicate images.

    textbind datagen cluster --config ... [cluster.num_clusters=100 cluster.dedup_threshold=0.95 ...]

`cluster.method=group` takes the input's own grouping instead of k-means: one cluster per `group` the pairs
name (an album, a web page, a product's photos), pairs without a group left out and counted.

Writes to OUTPUT_DIR:
    clusters.json          cluster sizes, duplicates removed per cluster, a few example captions each
    cluster_members.jsonl  one line per kept pair: id, key, caption, image, url, cluster
    duplicates.jsonl       one line per removed pair: id, the kept pair it duplicates, their cosine similarity

Similarities are cosines of the embeddings after subtracting their mean (`cluster.center`).
Near-duplicates are looked for inside each cluster only (two images that similar land in the same
cluster), which keeps the work linear in the number of clusters rather than quadratic in the data.
Within a cluster, pairs are visited in input order; a pair is removed when its cosine similarity to a
pair already kept exceeds `cluster.dedup_threshold`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from textbind.data.conversation import DataError
from textbind.datagen.config import ClusterConfig, DatagenConfig, config_from_arguments, step_parser
from textbind.datagen.embed import SourceEmbeddings, embed_pairs
from textbind.datagen.pairs import Pair
from textbind.datagen.report import read_jsonl, update_report
from textbind.io import atomic_write_json, atomic_write_jsonl

logger = logging.getLogger(__name__)

CLUSTERS_NAME = "clusters.json"
MEMBERS_NAME = "cluster_members.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"
SMALL_INPUT = 5_000_000  # embedding values below which k-means runs on one thread
DEDUP_BLOCK = 2048  # rows compared at once: bounds the memory of the similarity blocks


@dataclass
class Clustering:
    """Kept pairs grouped by topic."""

    clusters: list[list[Pair]]  # cluster index -> its kept pairs, in input order
    duplicates: list[dict]  # {"id", "duplicate_of", "similarity", "cluster"}
    summary: dict


def kmeans_labels(vectors: np.ndarray, num_clusters: int, seed: int, minibatch_above: int) -> np.ndarray:
    """A cluster label per row (k-means on the normalised vectors; mini-batch k-means for large inputs)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    if num_clusters == 1:
        return np.zeros(len(vectors), dtype=np.int64)
    if len(vectors) > minibatch_above:
        model = MiniBatchKMeans(n_clusters=num_clusters, random_state=seed, n_init=3,
                                batch_size=max(4096, 4 * num_clusters))
    else:
        model = KMeans(n_clusters=num_clusters, random_state=seed, n_init=3)
    # Small inputs run several times faster on one thread than with OpenMP threads spinning against
    # each other (and against anything else on the machine); large ones gain from all cores.
    threads = 1 if vectors.size < SMALL_INPUT else None
    with threadpool_limits(limits=threads):
        return model.fit_predict(vectors).astype(np.int64)


def near_duplicates(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(row, kept row it duplicates, similarity) for every row dropped by a greedy pass in row order."""
    kept: list[int] = []
    dropped: list[tuple[int, int, float]] = []
    for start in range(0, len(vectors), DEDUP_BLOCK):
        block = vectors[start:start + DEDUP_BLOCK]
        previous = block @ vectors[kept].T if kept else np.zeros((len(block), 0), dtype=vectors.dtype)
        inside = block @ block.T
        kept_here: list[int] = []
        for row in range(len(block)):
            candidates = [(previous[row, column], kept[column]) for column in np.flatnonzero(previous[row] > threshold)]
            candidates += [(inside[row, other], start + other) for other in kept_here if inside[row, other] > threshold]
            if candidates:
                similarity, original = max(candidates)
                dropped.append((start + row, original, float(similarity)))
            else:
                kept_here.append(row)
        kept += [start + row for row in kept_here]
    return dropped


def group_labels(pairs: list[Pair]) -> tuple[np.ndarray, int, int]:
    """A cluster label per pair from its `group` (clusters numbered in order of first appearance; -1 for a
    pair without a group, which no cluster takes), the number of clusters and of pairs left out."""
    numbers: dict[str, int] = {}
    labels = np.array([numbers.setdefault(pair.group, len(numbers)) if pair.group else -1 for pair in pairs])
    if not numbers:
        raise DataError("cluster.method=group, but no pair names a group: give the records a 'group' field (in a "
                        "shard, a 'group' in KEY.json), or use cluster.method=kmeans")
    ungrouped = int((labels < 0).sum())
    if ungrouped:
        logger.warning("%d pair(s) without a group left out (cluster.method=group)", ungrouped)
    return labels, len(numbers), ungrouped


def cluster_pairs(pairs: list[Pair], vectors: np.ndarray, config: ClusterConfig, seed: int) -> Clustering:
    if not pairs:
        raise DataError("no usable image-caption pairs to cluster (see the embed report for what was skipped)")
    if config.center:
        # Pooled image features share a large common direction; without it, similarities measure what
        # tells images apart, so k-means finds topics and the duplicate threshold means what it says.
        vectors = vectors - vectors.mean(axis=0, keepdims=True)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    ungrouped = 0
    if config.method == "group":
        labels, num_clusters, ungrouped = group_labels(pairs)
    else:
        num_clusters = min(config.num_clusters, len(pairs))
        if num_clusters < config.num_clusters:
            logger.warning("cluster.num_clusters=%d but only %d pair(s): using %d clusters", config.num_clusters,
                           len(pairs), num_clusters)
        labels = kmeans_labels(vectors, num_clusters, seed, config.minibatch_above)
    clusters: list[list[Pair]] = []
    duplicates: list[dict] = []
    removed_per_cluster: list[int] = []
    for cluster in range(num_clusters):
        rows = np.flatnonzero(labels == cluster)
        dropped = near_duplicates(vectors[rows], config.dedup_threshold) if config.dedup else []
        dropped_rows = {row for row, _, _ in dropped}
        for row, original, similarity in dropped:
            duplicates.append({"id": pairs[rows[row]].id, "duplicate_of": pairs[rows[original]].id,
                               "similarity": round(similarity, 6), "cluster": cluster})
        clusters.append([pairs[index] for position, index in enumerate(rows) if position not in dropped_rows])
        removed_per_cluster.append(len(dropped))
    sizes = [len(members) for members in clusters]
    summary = {
        "pairs": len(pairs),
        "method": config.method,
        "num_clusters_requested": config.num_clusters if config.method == "kmeans" else None,
        "num_clusters": num_clusters,
        "ungrouped": ungrouped,
        "dedup_threshold": config.dedup_threshold if config.dedup else None,
        "duplicates_removed": len(duplicates),
        "kept": sum(sizes),
        "sizes": sizes,
        "size_min": min(sizes),
        "size_max": max(sizes),
        "clusters": [
            {"cluster": index, "size": size, "duplicates_removed": removed,
             "examples": [pair.caption for pair in members[:config.examples_per_cluster]]}
            for index, (size, removed, members) in enumerate(zip(sizes, removed_per_cluster, clusters))
        ],
    }
    return Clustering(clusters, duplicates, summary)


def write_clustering(output_dir: str, clustering: Clustering) -> None:
    directory = Path(output_dir)
    atomic_write_jsonl(directory / MEMBERS_NAME, (
        {**asdict(pair), "cluster": index} for index, members in enumerate(clustering.clusters) for pair in members))
    atomic_write_jsonl(directory / DUPLICATES_NAME, clustering.duplicates)
    atomic_write_json(directory / CLUSTERS_NAME, clustering.summary)


def read_clusters(output_dir: str) -> list[list[Pair]]:
    """The kept pairs per cluster, as the cluster step wrote them."""
    path = Path(output_dir) / MEMBERS_NAME
    if not path.is_file() or not (Path(output_dir) / CLUSTERS_NAME).is_file():
        raise DataError(f"{path} not found: run `textbind datagen cluster` (or `run`) first")
    summary = json.loads((Path(output_dir) / CLUSTERS_NAME).read_text(encoding="utf-8"))
    clusters: list[list[Pair]] = [[] for _ in range(summary["num_clusters"])]
    for record in read_jsonl(path):
        cluster = record.pop("cluster")
        clusters[cluster].append(Pair(**record))
    return clusters


def run_cluster(config: DatagenConfig, embeddings: list[SourceEmbeddings] | None = None) -> Clustering:
    """Cluster the pairs' embeddings (embedding the sources the cache lacks) and write the cluster files."""
    embeddings = embed_pairs(config) if embeddings is None else embeddings
    pairs = [pair for result in embeddings for pair in result.pairs]
    vectors = np.concatenate([result.vectors for result in embeddings if len(result.pairs)]) if pairs else None
    clustering = cluster_pairs(pairs, vectors, config.cluster, config.run.seed)
    write_clustering(config.run.output_dir, clustering)
    report = {key: value for key, value in clustering.summary.items() if key != "clusters"}
    update_report(config.run.output_dir, "cluster", report)
    logger.info("%d pair(s) in %d cluster(s) (sizes %d..%d); %d near-duplicate(s) removed", report["kept"],
                report["num_clusters"], report["size_min"], report["size_max"], report["duplicates_removed"])
    return clustering


def main(argv: list[str] | None = None) -> int:
    parser = step_parser("textbind datagen cluster", "Cluster the embedded pairs into topics; drop near-duplicates.")
    config = config_from_arguments(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cluster(config)
    print(f"wrote {Path(config.run.output_dir) / CLUSTERS_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
