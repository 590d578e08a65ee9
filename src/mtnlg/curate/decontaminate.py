"""Decontamination against evaluation tasks, by the rules of Megatron's and NeMo's scripts (GPT-3's method):

- task items become n-grams of lowercased words: 13-grams, and an item of 8 to 12 words is used whole;
  shorter items are not used;
- an n-gram found in more than `max_documents` training documents is too common to mean contamination,
  and is ignored;
- in a training document, each match is cut out with `margin` characters on either side, the pieces shorter
  than `min_piece` characters are dropped, and a document cut into more than `max_splits` pieces is dropped
  whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtnlg.curate.text import word_spans, words
from mtnlg.errors import MtnlgError
from mtnlg.files import jsonl_lines


@dataclass(frozen=True)
class Rules:
    ngram: int = 13
    min_item: int = 8  # words; an item of min_item .. ngram - 1 words is one n-gram of its own length
    margin: int = 200  # characters cut on either side of a match
    min_piece: int = 200  # characters; shorter pieces are dropped
    max_splits: int = 10  # more pieces than this and the document goes
    max_documents: int = 10  # an n-gram in more training documents than this is ignored


def task_items(path: Path) -> Iterator[tuple[str, str]]:
    """(item id, text) of a task file: each JSONL record (its string fields joined, as `mtnlg eval` tasks
    hold question, choices and answer), or each non-empty line of a text file."""
    if not path.is_file():
        raise MtnlgError(f"{path}: no such task file; pass JSONL tasks (as `mtnlg eval` reads) or text files")
    if path.suffix == ".jsonl":
        for lineno, record in jsonl_lines(path):
            yield f"{path.name}:{lineno}", " ".join(_strings(record))
        return
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield f"{path.name}:{lineno}", line


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


class Contamination:
    """The task n-grams, each with the first task item that has it."""

    def __init__(self, items: Iterable[tuple[str, str]], rules: Rules = Rules()):
        self.rules = rules
        self.ngrams: dict[tuple[str, ...], str] = {}
        for item, text in items:
            tokens = tuple(words(text))
            if len(tokens) < rules.min_item:
                continue
            size = min(len(tokens), rules.ngram)
            for start in range(len(tokens) - size + 1):
                self.ngrams.setdefault(tokens[start : start + size], item)
        self.sizes = sorted({len(g) for g in self.ngrams})
        self.ignored: set[tuple[str, ...]] = set()

    def matches(self, text: str) -> list[tuple[int, int, tuple[str, ...]]]:
        """(start, end) character spans of the task n-grams in `text`, with the n-gram."""
        tokens, spans = word_spans(text)
        found = []
        for size in self.sizes:
            for start in range(len(tokens) - size + 1):
                gram = tuple(tokens[start : start + size])
                if gram in self.ngrams and gram not in self.ignored:
                    found.append((spans[start][0], spans[start + size - 1][1], gram))
        return found

    def ignore_common(self, documents: Iterable[set[tuple[str, ...]]]) -> None:
        """The first pass, given each training document's set of task n-grams (`matches`): ignore n-grams found
        in more than `max_documents` documents."""
        counts: Counter = Counter()
        for grams in documents:
            counts.update(grams)
        self.ignored = {gram for gram, n in counts.items() if n > self.rules.max_documents}

    def clean(self, text: str) -> tuple[list[str], list[str], str]:
        """The pieces of `text` that stay (none: dropped), the task items that hit it, and what became of it."""
        found = self.matches(text)
        if not found:
            return [text], [], "clean"
        cuts = sorted((max(0, s - self.rules.margin), min(len(text), e + self.rules.margin)) for s, e, _ in found)
        pieces, position = [], 0
        for start, end in cuts:
            if start > position:
                pieces.append(text[position:start])
            position = max(position, end)
        pieces.append(text[position:])
        items = sorted({self.ngrams[gram] for _, _, gram in found})
        if len(pieces) > self.rules.max_splits:
            return [], items, f"cut into {len(pieces)} pieces, more than {self.rules.max_splits}"
        kept = [p for p in pieces if len(p) >= self.rules.min_piece]
        return kept, items, f"{len(kept)} of {len(pieces)} pieces kept (under {self.rules.min_piece} characters dropped)"
