"""Preallocated key/value cache: generation appends one step at a time without reallocating.

It also remembers which cached positions are left padding, so a batch of prompts of different
lengths decodes exactly as each prompt would alone.
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig


class KVCache:
    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ):
        self.n_layer, self.max_len, self.dtype = cfg.n_layer, max_len, dtype
        # Allocated by the first `update`, from the keys' shape: under tensor parallelism a process holds
        # only its share of the heads, which the model config does not know.
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False
        self.length = 0

    def set_padding(self, valid: torch.Tensor) -> None:
        """Mark the next valid.size(1) positions: False where a row is left padding."""
        self.valid[:, self.length : self.length + valid.size(1)] = valid
        self.padded = self.padded or not bool(valid.all())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for one layer; return all keys/values so far."""
        if self.k is None:
            batch, heads, _, head_dim = k.shape
            shape = (self.n_layer, batch, heads, self.max_len, head_dim)
            self.k = torch.zeros(shape, device=k.device, dtype=self.dtype)
            self.v = torch.zeros(shape, device=k.device, dtype=self.dtype)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (in that order): beam search follows its surviving beams."""
        self.valid = self.valid[rows]
        if self.k is not None:
            self.k, self.v = self.k[:, rows], self.v[:, rows]

    def causal_mask(self, steps: int) -> torch.Tensor | None:
        """Boolean mask of `steps` new queries over all cached keys; None when every key is visible."""
        if steps == 1 and not self.padded:
            return None
        end = self.length + steps
        queries = torch.arange(self.length, end, device=self.valid.device)[:, None]
        keys = torch.arange(end, device=self.valid.device)[None, :]
        mask = keys <= queries
        if self.padded:
            # A padding query still sees itself, so no row of the softmax is empty (which would give NaN).
            mask = (mask & self.valid[:, None, None, :end]) | (keys == queries)
        return mask
