"""Step 3: choose each conversation's images, all from one cluster, balanced over clusters, seeded.

Clusters take turns in a seeded order (round robin), so cluster counts differ by at most one while
every cluster can still serve. Inside a cluster, images are dealt from a seeded shuffled deck: an image
comes back only after every other image of its cluster was used as often, and never more than
`sample.max_image_reuse` times in all. A conversation's image count is drawn from `sample.image_counts`
with `sample.image_count_weights`.

The plan is a pure function of the clusters, the sample config and the seed, and its first N
conversations do not depend on how many follow: asking for more conversations later extends a plan
(and reuses the answers already journaled) instead of reshuffling it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from textbind.datagen.config import SampleConfig
from textbind.datagen.pairs import Pair
from textbind.seeding import stable_seed


@dataclass
class PlannedConversation:
    """The images of one conversation to be written."""

    index: int
    cluster: int
    images: list[Pair]

    @property
    def id(self) -> str:
        return f"conv-{self.index:07d}"


@dataclass
class _Deck:
    """A cluster's images dealt in seeded shuffled rounds; round r uses each image for the r-th time."""

    members: list[Pair]
    rng: random.Random
    max_rounds: int
    order: list[int] = field(default_factory=list)
    round: int = 0

    def remaining(self) -> int:
        """Images still available: the rest of this round plus the rounds to come."""
        return len(self.order) + (self.max_rounds - self.round) * len(self.members)

    def can_deal(self, count: int) -> bool:
        return count <= len(self.members) and count <= self.remaining()

    def deal(self, count: int) -> list[Pair] | None:
        """`count` distinct images, or None (and nothing taken) when the cluster cannot give them."""
        if not self.can_deal(count):
            return None
        chosen: list[int] = []
        while len(chosen) < count:
            if not self.order:
                self.round += 1
                self.order = list(range(len(self.members)))
                self.rng.shuffle(self.order)
            # The next image not already in this conversation (one may be, across a round boundary; since
            # count <= len(members) a fresh round always holds one that is not).
            position = next(i for i, member in enumerate(self.order) if member not in chosen)
            chosen.append(self.order.pop(position))
        return [self.members[index] for index in chosen]


@dataclass
class SamplePlan:
    conversations: list[PlannedConversation]
    summary: dict


def plan_conversations(clusters: list[list[Pair]], config: SampleConfig, seed: int) -> SamplePlan:
    """Up to `config.num_conversations` conversations (fewer, reported, when the clusters run dry)."""
    decks = [_Deck(members, random.Random(stable_seed(seed, "deck", index)), config.max_image_reuse)
             for index, members in enumerate(clusters)]
    turn_order = list(range(len(clusters)))
    random.Random(stable_seed(seed, "cluster-order")).shuffle(turn_order)
    count_rng = random.Random(stable_seed(seed, "image-counts"))
    smallest = min(count for count, weight in zip(config.image_counts, config.image_count_weights) if weight > 0)
    conversations: list[PlannedConversation] = []
    turn = 0
    exhausted = False
    while len(conversations) < config.num_conversations:
        count = count_rng.choices(config.image_counts, weights=config.image_count_weights)[0]
        images = None
        for step in range(len(turn_order)):  # the next cluster in turn that can serve `count` images
            cluster = turn_order[(turn + step) % len(turn_order)]
            images = decks[cluster].deal(count)
            if images is not None:
                turn += step + 1
                break
        if images is None:
            if not any(deck.can_deal(smallest) for deck in decks):  # nothing can be dealt any more: stop
                exhausted = True
                break
            continue  # this count fits nowhere now; draw another count
        conversations.append(PlannedConversation(len(conversations), cluster, images))
    return SamplePlan(conversations, _summarize(conversations, clusters, config, exhausted))


def _summarize(conversations: list[PlannedConversation], clusters: list[list[Pair]], config: SampleConfig,
               exhausted: bool) -> dict:
    per_cluster = [0] * len(clusters)
    uses: dict[str, int] = {}
    per_count: dict[str, int] = {}
    for conversation in conversations:
        per_cluster[conversation.cluster] += 1
        per_count[str(len(conversation.images))] = per_count.get(str(len(conversation.images)), 0) + 1
        for pair in conversation.images:
            uses[pair.id] = uses.get(pair.id, 0) + 1
    return {
        "requested": config.num_conversations,
        "planned": len(conversations),
        "short_of_images": exhausted,
        "conversations_per_cluster": per_cluster,
        "images_per_conversation": dict(sorted(per_count.items(), key=lambda item: int(item[0]))),
        "distinct_images_used": len(uses),
        "max_image_uses": max(uses.values(), default=0),
    }
