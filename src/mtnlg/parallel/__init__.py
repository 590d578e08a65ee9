"""3D parallelism on torch.distributed: tensor, sequence, pipeline and data parallel, and the cluster planner."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the layout arithmetic and the planner import this package without torch
    import torch


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as a plain tensor (losses, norms and logits under tensor parallelism); a plain
    tensor as it is. Duck-typed, so that single-process code never imports torch.distributed.tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
