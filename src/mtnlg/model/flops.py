"""Analytic size of a model: parameters, training FLOPs per token, and training-state memory.

Used by MFU logging, `mtnlg info` and the planner; tests hold the parameter count equal to the real module's.
Only measuring a device's matmul rate needs torch, and imports it then: the arithmetic runs without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtnlg.config import ModelConfig

if TYPE_CHECKING:
    import torch

# Mixed-precision training state per parameter, as Megatron-LM counts it: bf16 weight (2) + fp32 gradient (4)
# + fp32 master weight (4) + fp32 Adam first and second moments (4 + 4).
TRAINING_BYTES_PER_PARAM = {"bf16 weights": 2, "fp32 gradients": 4, "fp32 master weights": 4, "fp32 Adam moments": 8}


@dataclass(frozen=True)
class ModelSize:
    params: int
    embedding_params: int  # token (+ learned position) embeddings and an untied head
    matmul_params: int  # weights every token multiplies through, LM head included
    flops_per_token: int  # forward + backward, attention scores included

    @property
    def training_bytes(self) -> int:
        return self.params * sum(TRAINING_BYTES_PER_PARAM.values())


def _block_matmul_params(cfg: ModelConfig) -> int:
    d, q, kv = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    n_up = 2 if cfg.mlp == "swiglu" else 1
    return d * (q + 2 * kv) + q * d + (n_up + 1) * d * cfg.d_ff


def norm_params(cfg: ModelConfig) -> int:
    """One norm's parameters: a scale, and a shift for LayerNorm with biases."""
    return cfg.d_model * (1 if cfg.norm == "rmsnorm" else 1 + int(cfg.bias))


def _block_vector_params(cfg: ModelConfig) -> int:
    """Biases and norm scales: parameters that are not matmul weights."""
    d, q, kv = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    n_up = 2 if cfg.mlp == "swiglu" else 1
    biases = int(cfg.bias or cfg.qkv_bias) * (q + 2 * kv) + int(cfg.bias) * (d + n_up * cfg.d_ff + d)
    return biases + 2 * norm_params(cfg) + 2 * cfg.head_dim * int(cfg.qk_norm)


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (what a pipeline stage holds per layer)."""
    return _block_matmul_params(cfg) + _block_vector_params(cfg)


def model_size(cfg: ModelConfig, seq_len: int | None = None) -> ModelSize:
    """Count parameters and FLOPs; attention FLOPs use `seq_len` (default: max_seq_len), causal mask ignored."""
    d, L = cfg.d_model, cfg.n_layer
    seq_len = seq_len or cfg.max_seq_len
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0) + head
    matmul = L * _block_matmul_params(cfg) + cfg.vocab_size * d
    params = L * block_params(cfg) + norm_params(cfg) + embedding
    # 2 FLOPs per multiply-add forward, twice that backward; QK^T and AV add 2 * 2 * seq * d per layer.
    flops = 3 * (2 * matmul + 4 * L * seq_len * cfg.n_head * cfg.head_dim)
    return ModelSize(params=params, embedding_params=embedding, matmul_params=matmul, flops_per_token=flops)


def human(n: float, unit: str = "") -> str:
    """1.23e12 -> '1.23T'."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


# Dense bf16 tensor-core peaks from the data sheets: MFU on these GPUs is reported against them.
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12}


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """The FLOP/s that MFU divides by: the data sheet for known GPUs, else a matmul measured here (in `dtype`,
    default fp32)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype | None = None, n: int = 1024) -> float:
    """Best of several square matmuls (default fp32): the practical peak of this device with the current
    thread count."""
    import torch

    dtype = dtype or torch.float32
    generator = torch.Generator(device).manual_seed(0)  # leave the global RNG alone: resume must be exact
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    best = float("inf")
    for _ in range(8):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
