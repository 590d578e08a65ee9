"""Faster CPU inference, applied to the model from outside.

Decoding reads every weight once per token, so its speed is that of the matrix-vector product. On
CPU, PyTorch's default fp32 linear streams weights at about a third of memory bandwidth for one or a
few rows; oneDNN's linear on weights pre-packed for small batches streams them at close to it
(docs/benchmarks.md). Projections that read the same input (q, k, v; SwiGLU's gate and up) are packed
into one matrix: one large product streams faster than three small ones. Weights may be packed in bf16:
half the bytes per step, so about twice the decode speed, at bf16's precision (activations stay fp32); or
in int8, a quarter of the bytes, as FBGEMM's dynamically quantized product: weights symmetric per output
channel, each product's input quantized on the fly, accumulated in int32, returned in fp32.
Packing drops autograd, so it is for inference only; training never sees it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mtnlg.hardware import this_cpu

# oneDNN picks the packed layout for this many rows; 8 is also the fastest layout for one row (measured).
PACK_FOR_ROWS = 8


class PackedLinear(nn.Module):
    """One or more nn.Linear layers that read the same input, as one oneDNN product on packed weights.

    Packed alone it replaces its linear. Packed with others, each keeps a `Slice` in its place: the
    first slice called computes the product for that input, the others return their part of it.
    """

    def __init__(self, linears: list[nn.Linear], dtype: torch.dtype = torch.float32):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.dtype = dtype
        self.sizes = [lin.out_features for lin in linears]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        if dtype == torch.int8:
            self.int8 = int8_weight(weight, bias)
            return
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), batch_size=PACK_FOR_ROWS)
        self.bias = None if bias is None else bias.to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights a product reads: the matrix, the bias, and int8's scales."""
        if self.dtype == torch.int8:
            weight, bias = torch.ops.quantized.linear_unpack(self.int8)
            tensors = [weight.int_repr(), weight.q_per_channel_scales().float(), bias]
        else:
            tensors = [self.weight, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.int8:
            # reduce_range: inputs quantized to 7 bits, so AVX2's 8-bit multiply-adds cannot saturate
            return torch.ops.quantized.linear_dynamic.default(x.float(), self.int8, True).to(x.dtype)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")
        return y.to(x.dtype)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All slices for input `x`, computed once however many slices ask."""
        if x is not self._input:
            self._input, self._outputs = x, self(x).split(self.sizes, dim=-1)
        return self._outputs


class Slice(nn.Module):
    """Output `index` of a PackedLinear: stands in for one of the linears packed into it."""

    def __init__(self, packed: PackedLinear, index: int):
        super().__init__()
        self.packed, self.index = [packed], index  # a list, so the shared module is not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed[0].outputs(x)[self.index]


def int8_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """An fp32 weight [out, in] (and bias) packed for FBGEMM's dynamically quantized product: int8, symmetric
    per output channel (scale = the row's largest magnitude / 127)."""
    scales = weight.abs().amax(1).clamp_min(1e-12).double() / 127
    zeros = torch.zeros_like(scales, dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; their successor (PT2E's oneDNN
        warnings.simplefilter("ignore", UserWarning)  # ops) has no dynamic product this fast yet (issue 15)
        quantized = torch.quantize_per_channel(weight.float(), scales, zeros, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.float())


# Sibling linears that read the same input: packed together.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def pack_for_cpu_inference(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap the fp32 CPU nn.Linear layers for oneDNN products on weights packed in `dtype` (in place), or for
    FBGEMM's on int8 weights, where this CPU has that path (`mtnlg.hardware`); elsewhere the model stays as it
    is, in fp32. bf16 needs `this_cpu().bf16`, int8 `this_cpu().int8` (`mtnlg.load` checks them)."""
    if not (this_cpu().int8 if dtype == torch.int8 else this_cpu().packed_linear):
        return model
    for module in list(model.modules()):
        linears = {name: child for name, child in module.named_children() if _packable(child)}
        groups = [[n for n in names if n in linears] for names in FUSED]
        groups = [g for g in groups if len(g) > 1 and len({linears[n].bias is None for n in g}) == 1]
        for names in groups:
            packed = PackedLinear([linears.pop(n) for n in names], dtype)
            for i, name in enumerate(names):
                setattr(module, name, Slice(packed, i))
        for name, linear in linears.items():
            setattr(module, name, PackedLinear([linear], dtype))
    return model


def _packable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
