"""Fine-tuning examples: records of four formats -> token rows in which only the responses are trained.

  Alpaca            {"instruction": ..., "input": ... (optional), "output": ...}   (.jsonl, or a .json array)
  chat              {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
  prompt/completion {"prompt": ..., "completion": ...}
  translation       {"src": ..., "tgt": ..., "src_lang": ..., "tgt_lang": ...}

Chat records are rendered by the tokenizer's chat template, the one `mtnlg chat` and the server use, and an
Alpaca record is the conversation of one user message (the instruction, then the input after a blank line)
and one assistant reply; a tokenizer without a template gets the default one, saved with the checkpoints.
A prompt/completion record is plain text, for tasks that are not conversations; a translation record is the
prompt `mtnlg eval` asks it with (`translation_prompt`), then " " and the target. Each piece of text is
tokenized on its own, as generation will meet it (the rendered prompt, then the reply), and every example
ends with the end-of-document token, so the model learns to stop.

Rows: packed (train.finetune.packing, the default) fills each row of max_seq_len + 1 tokens with whole
examples, positions restarting at each, so attention stays inside an example; padded gives each example a
row of its own, padded to the longest of its batch. The order is a seeded shuffle per epoch, so sample i
is a pure function of (seed, i) and the loader's state stays one integer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.config import FinetuneConfig
from mtnlg.data.batch import Row
from mtnlg.errors import MtnlgError
from mtnlg.eval.tasks import check_translation, is_translation, translation_prompt
from mtnlg.files import jsonl_lines
from mtnlg.finetune.contrastive import PAIR_FORMAT, is_pair, pair_rows
from mtnlg.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

FORMATS = ('Alpaca {"instruction", "input" (optional), "output"}, chat {"messages": [{"role", "content"}, ...]}, '
           'prompt/completion {"prompt", "completion"} or translation {"src", "tgt", "src_lang", "tgt_lang"}')

Segments = list[tuple[str, bool]]  # pieces of an example's text, and whether each is trained


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each example of a .jsonl file (one JSON object per line) or a .json array; where
    is "FILE:LINE" (or "FILE item N"), for messages about it."""
    if not path.is_file():
        raise MtnlgError(f"{path}: no such data file; pass a .jsonl (or .json) file of {FORMATS} records")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_bytes().decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError included
            raise MtnlgError(f"{path}: invalid JSON ({e}); a .json file holds one array of records") from None
        if not isinstance(items, list):
            raise MtnlgError(f"{path}: a .json data file holds one array of records; got {type(items).__name__}")
        yield from ((f"{path} item {i}", item) for i, item in enumerate(items, 1))
        return
    yield from ((f"{path}:{number}", record) for number, record in jsonl_lines(path))


def segments(record: Any, where: str, tokenizer: Tokenizer) -> Segments:
    """An example's text in pieces, each trained (responses) or not (prompts)."""
    if isinstance(record, dict) and "messages" in record:
        return chat_segments(record["messages"], where, tokenizer)
    if isinstance(record, dict) and "instruction" in record:
        _check_strings(record, ("instruction", "output"), where, optional=("input",))
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return chat_segments([{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}],
                             where, tokenizer)
    if isinstance(record, dict) and "prompt" in record:
        _check_strings(record, ("prompt", "completion"), where)
        return [(record["prompt"], False), (record["completion"], True)]
    if is_translation(record):
        try:
            check_translation(record)
        except ValueError as e:
            raise MtnlgError(f"{where}: {e}; fix the line") from None
        return [(translation_prompt(record), False), (" " + record["tgt"], True)]
    raise MtnlgError(f"{where}: not a fine-tuning example; expected {FORMATS}")


def _check_strings(record: dict, keys: Sequence[str], where: str, optional: Sequence[str] = ()) -> None:
    for key in (*keys, *(k for k in optional if k in record)):
        if not isinstance(record.get(key), str):
            raise MtnlgError(f"{where}: {key!r} must be a string (expected {FORMATS})")


def chat_segments(messages: Any, where: str, tokenizer: Tokenizer) -> Segments:
    """The conversation as the chat template renders it, the assistant replies trained: a reply is what the
    template adds between the prompt that asks for it (add_generation_prompt) and the conversation up to it."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise MtnlgError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}} with string values')
    if not any(m["role"] == "assistant" for m in messages):
        raise MtnlgError(f"{where}: the conversation has no assistant message to learn from")
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    pieces: Segments = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        after = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(after) and after.startswith(before) and len(before) >= done):
            raise MtnlgError(f"{where}: the chat template does not render this conversation turn by turn (each "
                             "prompt a prefix of the next), so the replies cannot be told apart; use another template")
        pieces += [(full[done : len(before)], False), (after[len(before) :], True)]
        done = len(after)
    return [p for p in pieces + [(full[done:], False)] if p[0]]


def uses_chat_template(record: Any) -> bool:
    return isinstance(record, dict) and ("messages" in record or "instruction" in record)


def translation_texts(records: Iterable[Any]) -> dict[str, list[str]]:
    """The texts of the translation records among `records`, by language (each source under its src_lang, each
    target under its tgt_lang): what `mtnlg.tokenizer.coverage_report` reads. Empty when there are none."""
    texts: dict[str, list[str]] = {}
    for record in records:
        if is_translation(record):
            for side in ("src", "tgt"):
                text, language = record.get(side), record.get(f"{side}_lang")
                if isinstance(text, str) and isinstance(language, str):
                    texts.setdefault(language, []).append(text)
    return texts


def tokenize(examples: Sequence[Segments], tokenizer: Tokenizer, train_on_prompt: bool) -> list[Row]:
    """Each example's tokens (its pieces tokenized one by one, then the end-of-document token) and which are
    trained: the responses and the end, or everything with `train_on_prompt`."""
    texts = [text for example in examples for text, _ in example]
    ids = iter(tokenizer.encode_batch(texts))
    rows = []
    for example in examples:
        pieces = [(next(ids), trained or train_on_prompt) for _, trained in example]
        tokens = np.array([t for piece, _ in pieces for t in piece] + [tokenizer.eod_id], np.int64)
        trained = np.array([flag for piece, flag in pieces for _ in piece] + [True])
        rows.append(Row(tokens, trained))
    return rows


class Examples:
    """Fine-tuning rows in a seeded order per epoch: packed several to a row of `seq_len` + 1 tokens, or one
    per row (padded at collation). Longer examples are cut to fit (`cut` counts them), and dropped when the
    cut leaves nothing to train (`dropped`: a prompt as long as the row). `contrastive`: the rows are
    (query, passage) pairs (`mtnlg.finetune.contrastive`)."""

    def __init__(self, examples: Sequence[Row], seq_len: int, seed: int, packing: bool, contrastive: bool = False):
        cut = [Row(e.tokens[: seq_len + 1], e.trained[: seq_len + 1], None if e.positions is None else e.positions[: seq_len + 1])
               for e in examples]
        self.examples = [e for e in cut if e.trained[1:].any()]
        self.cut = sum(len(e.tokens) > seq_len + 1 for e in examples)
        self.dropped = len(examples) - len(self.examples)
        if not self.examples:
            raise MtnlgError(f"no example has a response within model.max_seq_len ({seq_len}) tokens; add examples "
                             "or shorten their prompts")
        self.seq_len, self.seed, self.packing, self.contrastive = seq_len, seed, packing, contrastive
        self._starts = [0]  # the sample index where each epoch begins, for the epochs met so far
        self._epoch, self._rows = -1, []  # the latest epoch's rows

    def sample(self, i: int) -> Row:
        while i >= self._starts[-1]:
            self._starts.append(self._starts[-1] + len(self._rows_of(len(self._starts) - 1)))
        epoch = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._rows_of(epoch)[i - self._starts[epoch]]

    def _rows_of(self, epoch: int) -> list[Row]:
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            shuffled = [self.examples[j] for j in order]
            self._epoch, self._rows = epoch, self._pack(shuffled) if self.packing else shuffled
        return self._rows

    def _pack(self, examples: list[Row]) -> list[Row]:
        """Whole examples in order, each row filled until the next does not fit."""
        rows, current, length = [], [], 0
        for example in examples:
            if current and length + len(example.tokens) > self.seq_len + 1:
                rows.append(current)
                current, length = [], 0
            current.append(example)
            length += len(example.tokens)
        rows.append(current)
        return [
            Row(np.concatenate([e.tokens for e in row]), np.concatenate([e.trained for e in row]),
                np.concatenate([np.arange(len(e.tokens)) for e in row]))
            for row in rows
        ]


def examples(cfg: FinetuneConfig, tokenizer: Tokenizer, seq_len: int, seed: int) -> tuple[Examples, Examples | None]:
    """The training and validation rows of `cfg.data`: val_fraction of the examples (at least one, and never
    all) held out by a seeded draw. Installs the default chat template when chat or Alpaca records meet a
    tokenizer without one. A file of (query, passage) pairs gives contrastive rows, one pair each."""
    records = list(read_records(Path(cfg.data)))
    if not records:
        raise MtnlgError(f"{cfg.data}: no examples; add {FORMATS} records, one per line")
    contrastive = is_pair(records[0][1])
    mixed = next((where for where, r in records if is_pair(r) != contrastive), None)
    if mixed:
        raise MtnlgError(f"{mixed}: {PAIR_FORMAT} and generative examples in one file; train an embedder and a "
                         "generator from separate files")
    if contrastive:
        rows = pair_rows(records, tokenizer, seq_len)
    else:
        if tokenizer.chat_template is None and any(uses_chat_template(r) for _, r in records):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        rows = tokenize([segments(r, where, tokenizer) for where, r in records], tokenizer, cfg.train_on_prompt)
    held_out = min(max(1, round(cfg.val_fraction * len(rows))), len(rows) - 1) if cfg.val_fraction else 0
    order = np.random.default_rng([seed, len(rows)]).permutation(len(rows))
    val = sorted(order[:held_out])
    train = sorted(order[held_out:])
    packing = cfg.packing and not contrastive
    val_rows = Examples([rows[i] for i in val], seq_len, seed, packing, contrastive) if held_out else None
    return Examples([rows[i] for i in train], seq_len, seed, packing, contrastive), val_rows
