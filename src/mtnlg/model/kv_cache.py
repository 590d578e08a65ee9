"""Preallocated key/value cache with a length per row: each row is a slot that one sequence owns.

A forward through the cache reads tokens [rows, T]; row i continues its own sequence at position
lengths[i] and holds counts[i] <= T real tokens (the rest of its row is right padding, written to a scratch
position and never read). So sequences of different lengths decode together, a long prompt is read in
chunks, and a slot is reused by the next sequence once its owner is done: what a continuously batched
server needs. Used plainly (`model(x, cache=cache)` over every row, all tokens real) it is an ordinary cache.
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig


class KVCache:
    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ):
        self.n_layer, self.max_len, self.dtype, self.device = cfg.n_layer, max_len, dtype, torch.device(device)
        # Allocated by the first `update`, from the keys' shape: under tensor parallelism a process holds
        # only its share of the heads, which the model config does not know.
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on the CPU: the scheduler reads it every step
        self.select()

    @property
    def rows(self) -> int:
        return self.lengths.numel()

    def bytes_per_row(self, heads: int, head_dim: int) -> int:
        """Memory of one slot (keys and values of every layer): what a server states at start-up."""
        return 2 * self.n_layer * heads * (self.max_len + 1) * head_dim * self.dtype.itemsize

    def select(self, rows: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> None:
        """Say what the next forward reads: token row i goes to slot rows[i] (default: row i, every row)
        and holds counts[i] real tokens (default: all of them)."""
        self._rows, self._counts = rows, counts

    def begin(self, steps: int) -> torch.Tensor:
        """Start a forward of `steps` tokens per row: return their positions [rows, steps] and prepare the
        writes and the mask. Raises ValueError when a row would outgrow the cache."""
        slots = torch.arange(self.rows) if self._rows is None else self._rows.cpu()
        counts = torch.full((len(slots),), steps) if self._counts is None else self._counts.cpu()
        starts = self.lengths[slots]
        real_rows = counts > 0  # rows riding along with no token (free slots, others' prompts) need no keys
        end = int((starts + counts)[real_rows].max()) if real_rows.any() else 1
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {self.max_len}")
        offsets = torch.arange(steps)
        positions = starts[:, None] + offsets
        real = offsets < counts[:, None]
        self._slots, self._new_counts, self._end = slots, counts, end
        self._slot_index = slots.to(self.device)[:, None]
        self._write = torch.where(real, positions, self.max_len).to(self.device)  # padding -> scratch column
        self._contiguous = self._rows is None or bool((slots == torch.arange(len(slots))).all())
        uniform = bool((starts == starts[0]).all() and real.all())
        if uniform and steps == 1:
            self._mask = None  # one new token per row, every key visible: SDPA's fastest path
        else:
            keys = torch.arange(end)
            self._mask = (keys <= positions[:, :, None]).to(self.device)[:, None]  # [rows, 1, steps, keys]
        return positions.clamp(max=self.max_len - 1).to(self.device)

    def causal_mask(self) -> torch.Tensor | None:
        """Boolean mask of this forward's queries over the keys so far; None when every key is visible."""
        return self._mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values for one layer; return the rows' keys/values so far."""
        if self.k is None:
            _, heads, _, head_dim = k.shape
            shape = (self.n_layer, self.rows, heads, self.max_len + 1, head_dim)
            self.k = torch.zeros(shape, device=k.device, dtype=self.dtype)
            self.v = torch.zeros(shape, device=k.device, dtype=self.dtype)
        slots = self._slot_index
        # Indexing slots (dim 1) and positions (dim 3) around the heads puts [rows, steps] first.
        self.k[layer, slots, :, self._write] = k.transpose(1, 2).to(self.dtype)
        self.v[layer, slots, :, self._write] = v.transpose(1, 2).to(self.dtype)
        if self._contiguous:  # a view, not a copy: the decode step reads the first rows in place
            rows = slice(0, len(self._slots))
            return self.k[layer, rows, :, : self._end], self.v[layer, rows, :, : self._end]
        return self.k[layer, slots[:, 0], :, : self._end], self.v[layer, slots[:, 0], :, : self._end]

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real position of `x` [rows, steps, ...] -> [rows, 1, ...]."""
        if self._counts is None:
            return x[:, -1:]
        index = (self._new_counts - 1).clamp(min=0).to(x.device)
        return x[torch.arange(x.size(0), device=x.device), index][:, None]

    def advance(self) -> None:
        """The forward is done: its rows now hold their new tokens."""
        self.lengths[self._slots] += self._new_counts
        self.select()

    def reset(self, slot: int, keep: int = 0) -> None:
        """Start a slot's next sequence, keeping its first `keep` positions (a prefix it shares with the last
        one); the keys beyond stay, unread, until overwritten."""
        self.lengths[slot] = keep

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (in that order): beam search follows its surviving beams."""
        self.lengths = self.lengths[rows.cpu()]
        if self.k is not None:
            self.k, self.v = self.k[:, rows], self.v[:, rows]
