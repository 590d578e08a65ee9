"""A training batch: the rows of token ids, their next-token targets, and for packed examples the positions
that tell the model where each example starts.

Pretraining rows are windows of one token stream, every target counted. Fine-tuning rows hold examples
whose prompt tokens are not trained (their targets are IGNORE, which the loss skips) and, when packed,
several examples each, with positions restarting at 0 where an example begins so that attention stays
within it (`mtnlg.model.gpt.document_mask`). The loss of a step is the sum over its counted targets
divided by their number in the whole global batch (`loss_tokens`), so every token weighs the same however
the rows are cut into micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # a target that adds nothing to the loss (torch's cross_entropy default ignore_index)


@dataclass
class Row:
    """One sample before collation: tokens [n + 1]; which of them are trained as targets (None: all); and
    positions [n + 1] when the row packs several examples (None: 0, 1, 2, ...)."""

    tokens: np.ndarray
    trained: np.ndarray | None = None
    positions: np.ndarray | None = None


@dataclass
class Batch:
    inputs: torch.Tensor  # [rows, seq] int64
    targets: torch.Tensor  # [rows, seq] int64, IGNORE where nothing is learned
    positions: torch.Tensor | None = None  # [rows, seq] for packed examples

    @classmethod
    def collate(cls, rows: Sequence[Row | np.ndarray], multiple: int = 1, length: int = 0) -> Batch:
        """Rows of different lengths are padded at the end to the longest, or to `length` inputs (a pipeline's
        buffers keep one shape), and to a `multiple` (sequence parallelism splits it); pads are never targets.
        A target is ignored where it is not trained or where it starts the next packed example."""
        rows = [r if isinstance(r, Row) else Row(r) for r in rows]
        length = 1 + -(-max(length, max(len(r.tokens) for r in rows) - 1) // multiple) * multiple
        tokens = np.zeros((len(rows), length), np.int64)
        trained = np.zeros((len(rows), length), bool)
        packed = any(r.positions is not None for r in rows)
        positions = np.zeros((len(rows), length), np.int64) if packed else None
        for i, r in enumerate(rows):
            n = len(r.tokens)
            tokens[i, :n] = r.tokens
            trained[i, :n] = True if r.trained is None else r.trained
            if packed:
                positions[i, :n] = np.arange(n) if r.positions is None else r.positions
                positions[i, n:] = np.arange(length - n)  # the padding is an example of its own
        if packed:
            trained[:, 1:] &= positions[:, 1:] != 0  # no example learns the first token of the next
        targets = np.where(trained[:, 1:], tokens[:, 1:], IGNORE)
        return cls(
            torch.from_numpy(tokens[:, :-1].copy()),
            torch.from_numpy(targets),
            None if positions is None else torch.from_numpy(positions[:, :-1].copy()),
        )

    @property
    def loss_tokens(self) -> int:
        """How many targets the loss counts."""
        return int((self.targets != IGNORE).sum())

    def rows(self, rows: slice) -> Batch:
        return Batch(self.inputs[rows], self.targets[rows], None if self.positions is None else self.positions[rows])

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of `rows` rows."""
        return [self.rows(slice(start, start + rows)) for start in range(0, self.inputs.size(0), rows)]

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.positions))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward beside the tokens: packed rows' positions and mask."""
        if self.positions is None:
            return {}
        from mtnlg.model.gpt import document_mask

        return {"positions": self.positions, "mask": document_mask(self.positions)}
