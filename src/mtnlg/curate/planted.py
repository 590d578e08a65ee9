"""A corpus with planted near duplicates of known similarity, to measure fuzzy deduplication (tests, benchmark).

Documents are sentences of Zipf-distributed words, English function words the most frequent. A share of
them get edited copies: a number of words replaced at random, so the copies' Jaccard similarity to the
original (over the same shingles as the deduplication) spreads from ~0.2 to ~1.0. The truth is every pair's
exact Jaccard within a cluster.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mtnlg.curate.minhash import jaccard, shingles


# The most frequent words of English, at the top of the Zipf ranks, so the text passes stop-word checks.
FUNCTION_WORDS = ("the", "of", "and", "to", "a", "in", "that", "is", "was", "it", "for", "with", "as", "be", "on",
                  "have", "by", "at", "this", "from")


@dataclass
class Planted:
    texts: list[str]
    pairs: dict[tuple[int, int], float]  # exact Jaccard of every pair of documents in a planted cluster

    def scores(self, kept: set[int]) -> dict[str, float]:
        """Recall: share of pairs above 0.85 of which at most one document was kept. False removals: share of
        the documents with no planted partner at 0.7 or more that were removed."""
        high = [pair for pair, s in self.pairs.items() if s > 0.85]
        found = sum(1 for a, b in high if not (a in kept and b in kept))
        near = {i for pair, s in self.pairs.items() if s >= 0.7 for i in pair}
        lonely = [i for i in range(len(self.texts)) if i not in near]
        return {"pairs_above_0.85": len(high), "recall": found / max(1, len(high)),
                "documents_below_0.7": len(lonely),
                "false_removals": sum(1 for i in lonely if i not in kept) / max(1, len(lonely))}


def planted_corpus(documents: int, duplicated: float = 0.3, copies: int = 3, shingle: int = 5, seed: int = 0) -> Planted:
    """`documents` in all: originals, and for a `duplicated` share of them up to `copies` edited copies each."""
    rng = random.Random(seed)
    vocabulary = [*FUNCTION_WORDS, *(_word(rng) for _ in range(20_000))]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    texts: list[str] = []
    clusters: list[list[int]] = []
    while len(texts) < documents:
        words = rng.choices(vocabulary, weights, k=rng.randint(150, 400))
        cluster = [len(texts)]
        texts.append(_sentences(words, rng))
        if rng.random() < duplicated:
            for _ in range(min(rng.randint(1, copies), documents - len(texts))):
                edited = list(words)
                for i in rng.sample(range(len(edited)), rng.randint(1, max(1, len(edited) // 12))):
                    edited[i] = rng.choices(vocabulary, weights)[0]
                cluster.append(len(texts))
                texts.append(_sentences(edited, rng))
        clusters.append(cluster)
    sets = {i: shingles(texts[i], shingle) for cluster in clusters if len(cluster) > 1 for i in cluster}
    pairs = {(a, b): jaccard(sets[a], sets[b]) for cluster in clusters for a in cluster for b in cluster if a < b}
    return Planted(texts, pairs)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("etaoinshrdlucmfwypvbgkq") for _ in range(rng.randint(2, 9)))


def _sentences(words: list[str], rng: random.Random) -> str:
    """Words as sentences of 8-20 words, capitalized and ended with a period (the sentence breaks drawn anew
    for each copy: formatting the words do not see)."""
    out, i = [], 0
    while i < len(words):
        n = rng.randint(8, 20)
        out.append(" ".join(words[i : i + n]).capitalize() + ".")
        i += n
    return " ".join(out)
