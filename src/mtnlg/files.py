"""Writing a file so that no reader ever sees half of it (write beside it, then rename over it), and reading
JSONL so that a bad line is named."""

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from mtnlg.errors import MtnlgError


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to fill beside `path`: renamed over it when the block ends, removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))
    return path


def write_jsonl_atomic(path: Path, records: Iterable[Any]) -> Path:
    """Each record as one line of JSON (UTF-8, not escaped), written as `write_text_atomic` writes."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file; a line that is not UTF-8 JSON is an error
    naming file:line."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError included
                raise MtnlgError(f"{path}:{number}: invalid JSON ({e}); fix the line (UTF-8 JSON, one per line)") from None
            yield number, value
