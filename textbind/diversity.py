"""TextBind's diversity statistic of a set of texts: distinct n-grams over all n-grams, for n = 2, 3, 4."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def ngram_diversity(texts: Iterable[str], orders: Sequence[int] = (2, 3, 4)) -> float:
    """Sum over n in `orders` of (distinct n-grams / total n-grams) of the texts' whitespace tokens (lower-cased).

    Its maximum is len(orders) (3 for the paper's 2, 3, 4): every n-gram occurs once. An order with no
    n-gram at all (only short texts) adds nothing.
    """
    token_lists = [text.lower().split() for text in texts]
    total = 0.0
    for n in orders:
        grams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
        if grams:
            total += len(set(grams)) / len(grams)
    return total


def turn_diversity(conversations: Iterable[Sequence[str]], orders: Sequence[int] = (2, 3, 4)) -> float:
    """The paper's measure over conversations (each a sequence of turn texts): `ngram_diversity` of the texts
    at each turn index, averaged over the turn indices."""
    by_index: dict[int, list[str]] = {}
    for turns in conversations:
        for index, text in enumerate(turns):
            by_index.setdefault(index, []).append(text)
    if not by_index:
        return 0.0
    return sum(ngram_diversity(texts, orders) for texts in by_index.values()) / len(by_index)
