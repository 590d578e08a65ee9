"""Text embeddings from a language model: its final hidden states pooled and L2-normalized. The server's
/v1/embeddings and `mtnlg embed` / `mtnlg search` all call `embed`, so a text gets the same vector from each
(up to float rounding, which depends on what else shares its batch)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mtnlg.defaults import BATCH_SIZE

POOLINGS = ("mean", "last")


@torch.no_grad()
def embed(model: torch.nn.Module, inputs: list[list[int]], pooling: str = "mean", batch_size: int = BATCH_SIZE,
          progress: Callable[[int], object] | None = None) -> np.ndarray:
    """float32 [len(inputs), d_model]: each token list's pooled final hidden states, L2-normalized.

    inputs are the token ids of each text with nothing appended (non-empty, within the context). "mean"
    averages every position, "last" takes the last token's state (which has attended to all of them).
    Inputs run longest first, `batch_size` at a time, so that a batch holds similar lengths and little
    padding; right padding is never attended to (causal attention). progress(n) hears of each finished batch.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
    device = next(model.parameters()).device
    vectors = np.zeros((len(inputs), model.cfg.d_model), dtype=np.float32)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([len(inputs[i]) for i in rows], device=device)
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        for row, i in enumerate(rows):
            tokens[row, : len(inputs[i])] = torch.tensor(inputs[i])
        hidden = model(tokens, hidden=True).float()
        if pooling == "last":
            pooled = hidden[torch.arange(len(rows), device=device), lengths - 1]
        else:
            real = (torch.arange(tokens.size(1), device=device) < lengths[:, None]).float()[..., None]
            pooled = (hidden * real).sum(1) / lengths[:, None]
        vectors[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        if progress is not None:
            progress(len(rows))
    return vectors
