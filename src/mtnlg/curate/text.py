"""The word view of a text that the stages share: lowercase runs of letters and digits, with their spans."""

from __future__ import annotations

import re
import unicodedata

WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """What two copies of a document still share after reformatting: NFKC, lowercase, words joined by one space."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def word_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Lowercased words and their (start, end) character offsets in `text` (offsets need the text unchanged,
    so no NFKC here)."""
    found = list(WORD.finditer(text.lower()))
    return [m.group() for m in found], [m.span() for m in found]
