"""The word view of a text that the stages share: lowercase runs of letters and digits, with their spans."""

from __future__ import annotations

import re
import unicodedata

WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """What two copies of a document still share after reformatting: NFKC, lowercase, words joined by one space."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    return word_spans(text)[0]


def word_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words (each NFKC-normalized and lowercased on its own, so that their offsets stay those of `text`)
    and their (start, end) character offsets in `text`."""
    found = list(WORD.finditer(text))
    return [unicodedata.normalize("NFKC", m.group()).lower() for m in found], [m.span() for m in found]
