"""Text and JSONL -> train/validation token shards, one end-of-document token after each document."""

import json
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtnlg.data.indexed import IndexedDatasetWriter
from mtnlg.errors import MtnlgError
from mtnlg.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl")
CHUNK = 64  # documents per tokenization task


def _input_files(path: Path) -> list[Path]:
    """The files behind one input: itself, the documents of a `mtnlg curate` output folder, or every
    .txt/.jsonl below a directory, in sorted order."""
    if _is_curated(path):
        return [path / "documents.jsonl"]
    if (path / "work" / "00-read.done.json").is_file():
        raise MtnlgError(f"{path}: an unfinished `mtnlg curate` run (no report.json); run it again to finish "
                         "(it resumes), or pass the files you mean")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise MtnlgError(f"{path}: no .txt or .jsonl files inside; pass a directory that holds some")
        return files
    if not path.exists():
        raise MtnlgError(f"{path}: no such file or directory; pass an existing .txt or .jsonl file or a directory")
    if path.suffix not in SUFFIXES:
        raise MtnlgError(f"{path}: unsupported file type {path.suffix!r}; pass .txt or .jsonl files")
    return [path]


def _is_curated(path: Path) -> bool:
    return (path / "report.json").is_file() and (path / "documents.jsonl").is_file()


def curated_blend(inputs: Sequence[str | Path]) -> list[tuple[float, str, list[Path]]]:
    """(weight, name, files) per source of a `mtnlg curate --weights` output folder given alone; else empty."""
    if len(inputs) != 1 or not _is_curated(Path(inputs[0])) or not (Path(inputs[0]) / "blend.json").is_file():
        return []
    folder = Path(inputs[0])
    return [(s["weight"], Path(s["documents"]).stem, [folder / s["documents"]])
            for s in json.loads((folder / "blend.json").read_text())]


def read_documents(
    path: Path, json_key: str = "text", on_bad_line: str = "fail", skipped: list[str] | None = None
) -> Iterator[str]:
    """Yield the documents of a file or directory: a .txt file is one document, a .jsonl line is one (obj[json_key]).

    A malformed .jsonl line raises, or with on_bad_line="skip" is passed over and its "file:line: reason" is
    appended to `skipped`.
    """
    return (text for _, _, text, _ in read_with_origin(path, json_key, on_bad_line, skipped))


def read_with_origin(
    path: Path, json_key: str = "text", on_bad_line: str = "fail", skipped: list[str] | None = None
) -> Iterator[tuple[Path, int, str, dict]]:
    """`read_documents`, with where each document came from and what else its line holds: (file, line (0 for
    a whole .txt file), text, the line's other fields)."""
    if on_bad_line not in ("fail", "skip"):
        raise MtnlgError(f"on_bad_line must be 'fail' or 'skip', got {on_bad_line!r}")
    for file in _input_files(Path(path)):
        if file.suffix == ".txt":
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise MtnlgError(f"{file}: not UTF-8 text ({e}); convert it to UTF-8") from None
            yield file, 0, text, {}
            continue
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)  # bytes: bad UTF-8 raises here too
                except ValueError as e:
                    reason = f"invalid JSON ({e})"
                else:
                    text = obj.get(json_key) if isinstance(obj, dict) else None
                    if isinstance(text, str):
                        yield file, lineno, text, {k: v for k, v in obj.items() if k != json_key}
                        continue
                    reason = f"no string field {json_key!r}"
                if on_bad_line == "fail":
                    raise MtnlgError(f"{file}:{lineno}: {reason}; fix the line or pass --on-bad-line skip")
                if skipped is not None:
                    skipped.append(f"{file}:{lineno}: {reason}")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; don't oversubscribe the cores
    _worker_tokenizer = tokenizer


def _tokenize(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids followed by EOD."""
    eod = tokenizer.eod_id
    return [np.array(ids + [eod], dtype=np.uint32) for ids in tokenizer.encode_batch(texts)]


def _tokenize_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _tokenize(_worker_tokenizer, texts)


def _tokenized(texts: Iterable[str], tokenizer: Tokenizer, workers: int) -> Iterator[np.ndarray]:
    """Tokenize in input order; with workers > 1 on a process pool, keeping only a few chunks in flight."""
    if workers == 1:
        for chunk in _chunks(texts, CHUNK):
            yield from _tokenize(tokenizer, chunk)
        return
    # spawn, not fork: forking a process that already runs tokenizer or torch threads can deadlock
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool:
        pending = deque()
        for chunk in _chunks(texts, CHUNK):
            pending.append(pool.apply_async(_tokenize_in_worker, (chunk,)))
            if len(pending) > 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def prepare(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: Tokenizer,
    *,
    json_key: str = "text",
    val_fraction: float = 0.05,
    seed: int = 1234,
    workers: int = 1,
    on_bad_line: str = "fail",
    progress: bool = True,
) -> dict:
    """Tokenize every document of `inputs` into output_prefix + "_train" and "_val" shards; return counts.

    Each document goes to validation with probability val_fraction (seeded, so reruns agree), and each split gets
    at least one. With val_fraction 0 there is no "_val" shard (a stale one is removed), so training skips
    evaluation. Empty documents are dropped.
    """
    if not 0 <= val_fraction < 1:
        raise MtnlgError(f"val_fraction must be in [0, 1), got {val_fraction}; pass e.g. --val-fraction 0.05")
    if workers < 1:
        raise MtnlgError(f"workers must be at least 1, got {workers}")
    files = [f for p in inputs for f in _input_files(Path(p))]
    skipped: list[str] = []
    texts = (t for f in files for t in read_documents(f, json_key, on_bad_line, skipped) if t)
    tokenizer.eod_id  # before reading vocab_size: a tokenizer without EOD gains it here
    prefixes = {split: f"{output_prefix}_{split}" for split in (("train", "val") if val_fraction else ("train",))}
    stats = {"documents": 0, "train_documents": 0, "val_documents": 0, "train_tokens": 0, "val_tokens": 0}
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        # Shown on a terminal only, and cleared when done: the caller prints the summary (or the error).
        bar = tqdm(desc="tokenizing", unit=" docs", file=sys.stderr, disable=None if progress else True, leave=False)
        stack.enter_context(bar)
        writers = {s: stack.enter_context(IndexedDatasetWriter(p, tokenizer.vocab_size)) for s, p in prefixes.items()}

        def write(split: str, tokens: np.ndarray) -> None:
            writers[split].add_document(tokens)
            stats[f"{split}_documents"] += 1
            stats[f"{split}_tokens"] += len(tokens)

        # Each split's latest document is written one step late, so that it can still move to the other
        # split if that one would otherwise end up empty.
        held: dict[str, np.ndarray] = {}
        n_tokens = 0
        for tokens in _tokenized(texts, tokenizer, workers):
            split = "val" if rng.random() < val_fraction else "train"
            if split in held:
                write(split, held[split])
            held[split] = tokens
            stats["documents"] += 1
            n_tokens += len(tokens)
            bar.update()
            bar.set_postfix(tokens=n_tokens, refresh=False)
        if stats["documents"] == 0:
            note = f" ({len(skipped)} malformed lines skipped)" if skipped else ""
            raise MtnlgError(f"no text found in {', '.join(map(str, inputs))}{note}; pass files that contain documents")
        if val_fraction > 0:
            if stats["documents"] < 2:
                raise MtnlgError(
                    "need at least 2 documents to split train/validation; add documents or pass --val-fraction 0"
                )
            if "val" not in held:
                held["val"] = held.pop("train")
            elif "train" not in held:
                held["train"] = held.pop("val")
        for split, tokens in held.items():
            write(split, tokens)
    if not val_fraction:
        for ext in (".bin", ".idx"):
            Path(f"{output_prefix}_val{ext}").unlink(missing_ok=True)
    return {**stats, "skipped_lines": len(skipped), "outputs": list(prefixes.values())}
