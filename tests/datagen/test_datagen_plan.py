"""Clustering with near-duplicate removal, balanced seeded sampling with a reuse cap, reproducible prompts."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from textbind.data.conversation import DataError
from textbind.datagen.cluster import cluster_pairs
from textbind.datagen.config import ClusterConfig, ConfigError, PromptConfig, SampleConfig
from textbind.datagen.pairs import Pair
from textbind.datagen.prompt import (
    IMAGES_HEADER,
    PromptBuilder,
    load_seed_examples,
    load_template,
)
from textbind.datagen.sample import plan_conversations


def make_pairs(count: int, prefix: str = "p") -> list[Pair]:
    return [Pair(f"{prefix}{i}", f"k{i}", f"caption {prefix}{i}", f"/images/{prefix}{i}.png") for i in range(count)]


def test_clusters_follow_the_topics_and_duplicates_are_counted():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 10  # three orthogonal topics
    vectors, planted = [], []
    for index in range(60):
        topic = index % 3
        vector = centres[topic] + rng.normal(size=8)
        if index >= 48:  # the last 12 repeat an earlier member of their topic almost exactly
            vector = vectors[index - 45] + rng.normal(scale=1e-4, size=8)
            planted.append((index, index - 45))
        vectors.append(vector)
    vectors = np.array(vectors, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = make_pairs(60)

    clustering = cluster_pairs(pairs, vectors, ClusterConfig(num_clusters=3, dedup_threshold=0.999), seed=0)
    assert clustering.summary["duplicates_removed"] == 12
    assert sorted((d["id"], d["duplicate_of"]) for d in clustering.duplicates) == sorted(
        (f"p{i}", f"p{j}") for i, j in planted)
    topics = [{int(pair.id[1:]) % 3 for pair in members} for members in clustering.clusters]
    assert sorted(len(topic) for topic in topics) == [1, 1, 1]  # each cluster is one topic
    assert sorted(clustering.summary["sizes"]) == [16, 16, 16]
    assert sum(c["duplicates_removed"] for c in clustering.summary["clusters"]) == 12
    assert all(len(c["examples"]) == 5 for c in clustering.summary["clusters"])

    kept_everything = cluster_pairs(pairs, vectors, ClusterConfig(num_clusters=3, dedup=False), seed=0)
    assert kept_everything.summary["duplicates_removed"] == 0 and kept_everything.summary["kept"] == 60
    with pytest.raises(DataError, match="no usable"):
        cluster_pairs([], np.zeros((0, 8)), ClusterConfig(), seed=0)


def test_clusters_can_be_the_pairs_own_groups():
    """cluster.method=group: one cluster per group the pairs name (in order of first appearance), whatever the
    embeddings say; pairs without a group are left out and counted; near-duplicates still go within a group."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(9, 8)).astype(np.float32)
    vectors[4] = vectors[1] + 1e-5  # a near-copy of pair 1, in the same album
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    albums = ["b", "a", "b", "", "a", "c", "a", "", "c"]
    pairs = [Pair(f"p{i}", f"k{i}", f"caption {i}", f"/images/{i}.png", group=album) for i, album in enumerate(albums)]

    config = ClusterConfig(method="group", num_clusters=50, dedup_threshold=0.999)
    clustering = cluster_pairs(pairs, vectors, config, seed=0)
    assert [[pair.id for pair in members] for members in clustering.clusters] == [["p0", "p2"], ["p1", "p6"],
                                                                                 ["p5", "p8"]]
    assert [(d["id"], d["duplicate_of"]) for d in clustering.duplicates] == [("p4", "p1")]
    summary = clustering.summary
    assert summary["method"] == "group" and summary["num_clusters"] == 3 and summary["ungrouped"] == 2
    assert summary["num_clusters_requested"] is None and summary["kept"] == 6

    without_groups = [Pair(f"p{i}", f"k{i}", "c", "/i.png") for i in range(3)]
    with pytest.raises(DataError, match="no pair names a group"):
        cluster_pairs(without_groups, vectors[:3], config, seed=0)
    with pytest.raises(ConfigError, match="cluster.method"):
        ClusterConfig(method="albums").validate()


def clusters_of(sizes: list[int]) -> list[list[Pair]]:
    return [make_pairs(size, prefix=f"c{index}_") for index, size in enumerate(sizes)]


def test_sampling_is_balanced_seeded_within_one_cluster_and_caps_reuse():
    clusters = clusters_of([30, 25, 40, 20])  # every cluster has room for its share of 60 conversations
    config = SampleConfig(num_conversations=60, image_counts=[2, 3, 4, 5], image_count_weights=[1, 1, 1, 1],
                          max_image_reuse=4)
    plan = plan_conversations(clusters, config, seed=3)
    assert len(plan.conversations) == 60
    per_cluster = Counter(conversation.cluster for conversation in plan.conversations)
    assert max(per_cluster.values()) - min(per_cluster.values()) <= 1
    uses = Counter(pair.id for conversation in plan.conversations for pair in conversation.images)
    assert max(uses.values()) <= 4
    # Within a cluster, an image comes back only after all the others were used as often.
    for index, members in enumerate(clusters):
        counts = [uses.get(pair.id, 0) for pair in members]
        assert max(counts) - min(counts) <= 1, index
    for conversation in plan.conversations:
        assert 2 <= len(conversation.images) <= 5
        assert len({pair.id for pair in conversation.images}) == len(conversation.images)
        assert all(pair.id.startswith(f"c{conversation.cluster}_") for pair in conversation.images)
    assert set(Counter(len(c.images) for c in plan.conversations)) == {2, 3, 4, 5}

    again = plan_conversations(clusters, config, seed=3)
    assert [[p.id for p in c.images] for c in again.conversations] == [[p.id for p in c.images]
                                                                     for c in plan.conversations]
    other = plan_conversations(clusters, config, seed=4)
    assert [[p.id for p in c.images] for c in other.conversations] != [[p.id for p in c.images]
                                                                     for c in plan.conversations]
    # Asking for fewer conversations gives a prefix of the plan: a later, larger run extends it.
    shorter = plan_conversations(clusters, SampleConfig(**{**config.__dict__, "num_conversations": 20}), seed=3)
    assert [[p.id for p in c.images] for c in shorter.conversations] == [[p.id for p in c.images]
                                                                       for c in plan.conversations[:20]]


def test_sampling_stops_when_the_reuse_cap_is_reached():
    clusters = clusters_of([6, 6])
    config = SampleConfig(num_conversations=100, image_counts=[3], image_count_weights=[1], max_image_reuse=1)
    plan = plan_conversations(clusters, config, seed=0)
    assert len(plan.conversations) == 4 and plan.summary["short_of_images"]
    uses = Counter(pair.id for conversation in plan.conversations for pair in conversation.images)
    assert set(uses.values()) == {1} and len(uses) == 12
    # A cluster smaller than the image count is never used.
    plan = plan_conversations(clusters_of([2, 9]), SampleConfig(num_conversations=3, image_counts=[3],
                                                                image_count_weights=[1]), seed=0)
    assert {conversation.cluster for conversation in plan.conversations} == {1}


def test_prompt_is_reproducible_and_ends_with_the_image_list(tmp_path):
    captions = ["a {weird} caption with {images} inside", "a dog <on> a sofa", "a cat"]
    builder = PromptBuilder(PromptConfig(num_examples=2), seed=7)
    messages = builder.messages(5, captions)
    assert messages == PromptBuilder(PromptConfig(num_examples=2), seed=7).messages(5, captions)
    assert messages != builder.messages(6, captions) or len(builder.pool) <= 2
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[-1]["content"]
    expected_tail = f"\n{IMAGES_HEADER}\n" + "\n".join(f"<img{i}>{c}</img{i}>" for i, c in enumerate(captions))
    assert user.endswith(expected_tail)
    assert user.count(f"\n{IMAGES_HEADER}\n") == 1  # examples never use the request's header line
    assert len(re.findall(r"^Example \d+$", user, re.M)) == 2
    assert "{examples}" not in user and "{num_images}" not in user

    # The examples come from the pool: an edited pool changes what the prompt shows.
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "mine", "images": [{"caption": "a red kite"}],
                                "response": "Human: Look: <img0>a red kite</img0>\nAssistant: Nice kite.\n"
                                            "Human: Thanks."}) + "\n")
    mine = PromptBuilder(PromptConfig(seed_examples=str(pool), num_examples=3), seed=7).messages(0, ["a cat"])
    assert "<img0>a red kite</img0>" in mine[-1]["content"]
    assert len(re.findall(r"^Example \d+$", mine[-1]["content"], re.M)) == 1

    template = tmp_path / "template.txt"
    template.write_text("[user]\nWrite something.\n{examples}\nImages:\n{images}\nThanks!\n")
    with pytest.raises(DataError, match="must end with"):
        load_template(str(template))
    pool.write_text('{"id": "bad", "images": [{"caption": "a cat"}], "response": "Human: <img0>a dog</img0>"}\n')
    with pytest.raises(DataError, match="line 1"):
        load_seed_examples(str(pool))


def test_the_shipped_seed_pool_quotes_its_captions():
    pool = load_seed_examples()
    assert len(pool) >= 8 and len({example.id for example in pool}) == len(pool)
    assert all(example.response.startswith("Human:") for example in pool)
