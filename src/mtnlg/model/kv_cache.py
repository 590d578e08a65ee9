"""Preallocated key/value cache: generation appends one step at a time without reallocating."""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig


class KVCache:
    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for one layer; return all keys/values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def causal_mask(self, steps: int) -> torch.Tensor | None:
        """Mask for `steps` new queries over all cached keys; None when every key is visible (one new token)."""
        if steps == 1:
            return None
        end = self.length + steps
        queries = torch.arange(self.length, end, device=self.k.device)[:, None]
        return torch.arange(end, device=self.k.device)[None, :] <= queries
