"""Faster CPU inference, applied to the model from outside.

Decoding reads every weight once per token, so its speed is that of the matrix-vector product. On
CPU, PyTorch's default fp32 linear streams weights at about a third of memory bandwidth for one or a
few rows, while oneDNN's linear on pre-packed weights gets close to it (docs/benchmarks.md). Packing
drops autograd, so it is for inference only; training never sees it.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """nn.Linear's forward on oneDNN-packed weights; takes and returns ordinary tensors."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.size(-1)).to_mkldnn(), self.weight, self.bias)
        return y.to_dense().view(*x.shape[:-1], -1)


def pack_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap every fp32 CPU nn.Linear for a PackedLinear (in place) where oneDNN is available."""
    if not torch.backends.mkldnn.is_available():
        return model
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
                setattr(module, name, PackedLinear(child))
    return model
