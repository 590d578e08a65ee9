"""Fuzzy duplicates by MinHash and LSH (Broder 1997; MT-NLG deduplicated at Jaccard ~0.8 this way).

A document is the set of its word n-grams (shingles). Each of `bands * rows` seeded hash permutations keeps
the smallest shingle hash; two documents agree on a permutation with probability equal to their Jaccard
similarity s. Documents that agree on all `rows` values of any of the `bands` bands become candidates, with
probability 1 - (1 - s^rows)^bands: an S-curve rising around (1/bands)^(1/rows). Candidates can then be
verified by their exact Jaccard, and verified pairs join clusters (union-find), of which one document stays.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mtnlg.curate.text import words

MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: combining word hashes into a shingle hash loses nothing to it


@dataclass(frozen=True)
class MinHash:
    shingle: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8
    seed: int = 0

    @property
    def permutations(self) -> int:
        return self.bands * self.rows

    def threshold(self) -> float:
        """The similarity at which the S-curve is steepest, about where candidates start."""
        return (1 / self.bands) ** (1 / self.rows)

    def candidate_probability(self, similarity: float) -> float:
        return 1 - (1 - similarity**self.rows) ** self.bands

    def s_curve(self) -> str:
        points = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
        return ", ".join(f"{s:.2f}: {self.candidate_probability(s):.3f}" for s in points)

    def _coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        keys = rng.integers(0, 2**63, self.permutations, dtype=np.uint64)
        odd = rng.integers(0, 2**63, self.permutations, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return keys, odd

    def signature(self, text: str) -> np.ndarray:
        """The document's `permutations` minimum hashes (uint64). Each permutation is multiply-shift hashing,
        ((h xor key) * odd mod 2^64) >> 32; the textbook (a h + b) mod p, with a, h < 2^32 and p = 2^61 - 1,
        estimated Jaccard 0.63 as 0.47 (measured), so it is not used."""
        hashes = shingles(text, self.shingle)
        keys, odd = self._coefficients()
        return (((hashes[:, None] ^ keys[None]) * odd[None]) >> np.uint64(32)).min(axis=0)

    def band_keys(self, signature: np.ndarray) -> list[bytes]:
        return [band.to_bytes(4, "little") + signature[band * self.rows : (band + 1) * self.rows].tobytes()
                for band in range(self.bands)]


def shingles(text: str, size: int) -> np.ndarray:
    """The distinct hashes (uint32, as uint64) of the text's word `size`-grams; a shorter text is one shingle."""
    tokens = words(text) or [""]
    hashed = np.fromiter((zlib.crc32(w.encode()) for w in tokens), dtype=np.uint64, count=len(tokens))
    size = min(size, len(hashed))
    count = len(hashed) - size + 1
    combined = np.zeros(count, dtype=np.uint64)
    for offset in range(size):  # a polynomial in the word hashes, wrapping at 2^64
        combined = combined * MIX + hashed[offset : offset + count]
    return np.unique((combined >> np.uint64(32)) ^ (combined & np.uint64(0xFFFFFFFF)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Of two sorted, distinct shingle-hash arrays."""
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


BUCKET_PAIRS = 16  # a document pairs with up to this many earlier documents of each bucket


def candidate_pairs(params: MinHash, signatures: Iterable[np.ndarray]) -> Iterator[tuple[int, int]]:
    """Pairs (i, j), i < j, of documents sharing a band. Each document pairs with the first BUCKET_PAIRS
    documents of its bucket, not just the first: when candidates are verified, a first document unlike the
    others must not keep two true duplicates behind it from meeting."""
    buckets: dict[bytes, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    for index, signature in enumerate(signatures):
        for key in params.band_keys(signature):
            members = buckets.setdefault(key, [])
            for earlier in members:
                if (earlier, index) not in seen:
                    seen.add((earlier, index))
                    yield earlier, index
            if len(members) < BUCKET_PAIRS:
                members.append(index)


class Clusters:
    """Union-find over document indices."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return [sorted(members) for members in out.values() if len(members) > 1]
