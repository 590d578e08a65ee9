"""AdamW with decoupled weight decay on matrices only, warmup + cosine LR, and batch-size ramp-up."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from mtnlg.config import TrainConfig


def build_optimizer(
    model: nn.Module | Iterable[nn.Parameter], cfg: TrainConfig, fused: bool = False
) -> torch.optim.AdamW:
    """Matrices (weights, embeddings) decay; biases and norm scales don't, as in GPT-3 and Megatron.
    `model` may also be a list of parameters, such as a pipeline's `parameters()`."""
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # LoRA trains matrices alone; checkpoints refuse an empty group
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None, foreach=None if fused else True
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine decay to `min_lr_ratio` of it."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or cfg.max_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def batch_size_at(consumed_samples: int, cfg: TrainConfig) -> int:
    """Global batch size after `consumed_samples`: ramps from `rampup_start` by `rampup_increment`
    in equal sample intervals over `rampup_samples`, as MT-NLG went 32 -> 1920 (Megatron's rule)."""
    if not cfg.rampup_start or consumed_samples >= cfg.rampup_samples:
        return cfg.global_batch_size
    n_increments = (cfg.global_batch_size - cfg.rampup_start) // cfg.rampup_increment
    samples_per_increment = cfg.rampup_samples / max(1, n_increments)
    return cfg.rampup_start + int(consumed_samples // samples_per_increment) * cfg.rampup_increment
