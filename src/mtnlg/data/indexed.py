"""The token store: prefix.bin holds every document's tokens back to back, prefix.idx where each one starts.

Memory-mapped, so a corpus far larger than RAM costs nothing to open. Documents are stored exactly as given;
`prepare` ends each one with the end-of-document token.

.idx layout (little endian): b"MTNLGIDX", u32 version, u32 dtype code, i64 documents, i64 tokens,
then i64 offsets[documents + 1] (offsets[0] == 0, offsets[-1] == tokens).
"""

import os
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtnlg.errors import MtnlgError

MAGIC = b"MTNLGIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIqq")
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id: half the disk and page cache for vocabularies <= 65536."""
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


class IndexedDatasetWriter:
    """Writes prefix.bin/.idx under temporary names and renames them on a successful close, so readers never see
    half a shard. As a context manager, an exception discards the temporaries."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.bin_path, self.idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.offsets = array("q", [0])
        self._bin = open(self._tmp(self.bin_path), "wb")

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {tokens.min()}..{tokens.max()}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + tokens.size)

    def close(self) -> None:
        self._bin.close()
        header = _HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], len(self.offsets) - 1, self.offsets[-1])
        with open(self._tmp(self.idx_path), "wb") as f:
            f.write(header + np.asarray(self.offsets, dtype="<i8").tobytes())
        os.replace(self._tmp(self.bin_path), self.bin_path)
        os.replace(self._tmp(self.idx_path), self.idx_path)

    def _discard(self) -> None:
        self._bin.close()
        for path in (self.bin_path, self.idx_path):
            self._tmp(path).unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()


class IndexedDataset:
    """Read-only view of a shard: `tokens` is the flat stream, document i is tokens[offsets[i]:offsets[i + 1]]."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        if not (bin_path.is_file() and idx_path.is_file()):
            raise MtnlgError(f"{self.prefix}: no such token shard (.bin + .idx); run `mtnlg prepare` first")
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or not header.startswith(MAGIC):
            raise MtnlgError(f"{idx_path}: not an mtnlg token index; re-run `mtnlg prepare`")
        _, version, code, n_docs, n_tokens = _HEADER.unpack(header)
        if version != VERSION or code not in _DTYPES:
            raise MtnlgError(f"{idx_path}: unsupported index version {version}; re-run `mtnlg prepare`")
        self.dtype = _DTYPES[code]
        if idx_path.stat().st_size != _HEADER.size + 8 * (n_docs + 1):
            raise MtnlgError(f"{idx_path}: truncated or corrupt; re-run `mtnlg prepare`")
        if bin_path.stat().st_size != n_tokens * self.dtype.itemsize:
            raise MtnlgError(
                f"{bin_path}: holds {bin_path.stat().st_size} bytes, the index expects "
                f"{n_tokens * self.dtype.itemsize}; re-run `mtnlg prepare`"
            )
        self.offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(n_docs + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != n_tokens:
            raise MtnlgError(f"{idx_path}: offsets do not match the header; re-run `mtnlg prepare`")
        # numpy cannot memory-map an empty file
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]
