"""Quality heuristics in the style of Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020).

Each check measures one thing about a document and compares it with its threshold; the first that fails
names the reason it goes. Defaults are the papers' values; `--quality NAME=VALUE` changes one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

from mtnlg.curate.text import words
from mtnlg.errors import MtnlgError

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "◦", "·")


@dataclass(frozen=True)
class Thresholds:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1  # "#" and "..." per word
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # share of lines ending with "..." or "…"
    min_alpha_words: float = 0.8  # share of words with a letter
    min_stop_words: int = 2  # of the, be, to, of, and, that, have, with
    max_duplicate_lines: float = 0.3  # share of lines that repeat an earlier line
    max_top_2gram: float = 0.2  # share of characters in the most frequent word 2-gram
    max_top_3gram: float = 0.18
    max_top_4gram: float = 0.16
    max_duplicate_5gram: float = 0.15  # share of characters in word 5-grams seen before in the document
    max_duplicate_10gram: float = 0.10
    max_curly_brackets: int = 0  # C4: code
    lorem_ipsum: bool = False  # C4: placeholder text is allowed (False: it is not)

    @classmethod
    def parse(cls, settings: list[str]) -> Thresholds:
        """From NAME=VALUE strings (the CLI's --quality)."""
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for setting in settings:
            name, _, raw = setting.partition("=")
            if name not in known or not raw:
                raise MtnlgError(f"--quality {setting!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
            try:
                kind = {"int": int, "float": float, "bool": lambda v: {"true": True, "false": False}[v.lower()]}[known[name]]
                values[name] = kind(raw)
            except (KeyError, ValueError):
                raise MtnlgError(f"--quality {setting!r}: {raw!r} is not a {known[name]}") from None
            if values[name] < 0:
                raise MtnlgError(f"--quality {setting!r}: thresholds are not negative")
        return cls(**values)


def failed_check(text: str, t: Thresholds) -> str | None:
    """The first check the document fails, as "name (measured vs threshold)", or None when it passes."""
    tokens = words(text)
    n = len(tokens)
    checks = [("min_words", n, n >= t.min_words), ("max_words", n, n <= t.max_words)]
    if n:
        mean = sum(map(len, tokens)) / n
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
        symbols = (text.count("#") + text.count("...") + text.count("…")) / n
        checks += [
            ("min_mean_word_length", mean, mean >= t.min_mean_word_length),
            ("max_mean_word_length", mean, mean <= t.max_mean_word_length),
            ("max_symbol_ratio", symbols, symbols <= t.max_symbol_ratio),
            ("max_bullet_lines", share(lines, lambda line: line.startswith(BULLETS)), None),
            ("max_ellipsis_lines", share(lines, lambda line: line.endswith(("...", "…"))), None),
            ("min_alpha_words", share(tokens, lambda w: any(c.isalpha() for c in w)), None),
            ("min_stop_words", len(STOP_WORDS.intersection(tokens)), None),
            ("max_duplicate_lines", 1 - len(set(lines)) / len(lines), None),
            *[(f"max_top_{k}gram", top_ngram_share(tokens, k), None) for k in (2, 3, 4)],
            *[(f"max_duplicate_{k}gram", duplicate_ngram_share(tokens, k), None) for k in (5, 10)],
            ("max_curly_brackets", text.count("{"), None),
            ("lorem_ipsum", "lorem ipsum" in text.lower(), None),
        ]
    for name, value, ok in checks:
        limit = getattr(t, name)
        if ok is None:
            ok = value == limit or (value >= limit if name.startswith("min") else value <= limit)
        if not ok:
            return f"{name} ({value:.3g} vs {limit})" if not isinstance(value, bool) else name
    return None


def share(items: list, test) -> float:
    return sum(1 for item in items if test(item)) / len(items) if items else 0.0


def top_ngram_share(tokens: list[str], k: int) -> float:
    """Characters in the most frequent word k-gram (all its occurrences) over all characters of words."""
    grams = Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return sum(map(len, gram)) * count / max(1, sum(map(len, tokens)))


def duplicate_ngram_share(tokens: list[str], k: int) -> float:
    """Characters of words covered by word k-grams that occurred earlier in the document, over all."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(tokens)
    for i in range(len(tokens) - k + 1):
        gram = tuple(tokens[i : i + k])
        if gram in seen:
            covered[i : i + k] = [True] * k
        seen.add(gram)
    return sum(len(w) for w, c in zip(tokens, covered) if c) / max(1, sum(map(len, tokens)))

