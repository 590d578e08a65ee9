"""LoRA (Hu et al., 2021) applied to the one model from outside, like the parallel layouts: each target
linear layer keeps its frozen weight and gains two small trained matrices, A [r, in] and B [out, r], and
computes W x + b + (alpha / r) B A dropout(x).

The adapters are parameters of the layer they adapt (`blocks.0.attn.q_proj.lora_A`), so every other name
stays the base model's: base checkpoints load unchanged, and the tensor-parallel plan still finds its
layers. Under tensor parallelism they are split to match the layer: a column-parallel layer (weight
Shard(0)) keeps A whole and splits B's rows with its outputs; a row-parallel layer (weight Shard(1)) splits
A's columns with its inputs and keeps B whole, its partial sums reduced with the layer's own. A starts
Kaiming-uniform and B at zero (peft's and the paper's choice), so a new adapter leaves the model as it was;
both are drawn per (seed, name), so every layout starts from the same adapters.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import LORA_TARGETS, LoraConfig, ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT, seeded_generator

if TYPE_CHECKING:
    from mtnlg.parallel.parallelize import Initial

ADAPTERS = ("lora_A", "lora_B")


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTERS


def check_targets(model_cfg: ModelConfig, lora: LoraConfig) -> None:
    """Every target names layers this model has, and none shares its weight with another."""
    with torch.device("meta"):
        present = {name.rsplit(".", 1)[-1] for name, m in GPT(model_cfg).named_modules() if isinstance(m, nn.Linear)}
    for target in lora.targets:
        if target not in present:
            raise MtnlgError(f"lora.targets: this model has no {target} layers; its linear layers are "
                             f"{', '.join(t for t in LORA_TARGETS if t in present)}")
    if "lm_head" in lora.targets and model_cfg.tie_embeddings:
        raise MtnlgError("lora.targets: lm_head shares its weight with the token embedding (model.tie_embeddings), "
                         "so an adapter on it cannot be merged; drop lm_head from the targets")


def apply_lora(model: GPT, lora: LoraConfig) -> None:
    """Freeze every parameter of `model` (whole, or a pipeline stage, possibly tensor-parallel) and give each
    target layer trainable adapters A and B (values set later, by `materialize` with `with_new_adapters`)."""
    check_targets(model.cfg, lora)
    model.requires_grad_(False)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and name.rsplit(".", 1)[-1] in lora.targets:
            _add_adapter(layer, lora)


def _add_adapter(layer: nn.Linear, lora: LoraConfig) -> None:
    weight = layer.weight
    out_features, in_features = weight.shape  # a DTensor's are the whole layer's
    a = torch.empty(lora.r, in_features, device=weight.device, dtype=weight.dtype)
    b = torch.empty(out_features, lora.r, device=weight.device, dtype=weight.dtype)
    placements = getattr(weight, "placements", None)
    if placements is not None:  # tensor parallel: split the adapters as the layer is split
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        column = placements == (Shard(0),)
        a = distribute_tensor(a, weight.device_mesh, [Replicate() if column else Shard(1)])
        b = distribute_tensor(b, weight.device_mesh, [Shard(0) if column else Replicate()])
    layer.lora_A, layer.lora_B = nn.Parameter(a), nn.Parameter(b)
    layer.lora_dropout = nn.Dropout(lora.dropout)
    layer.lora_scaling = lora.alpha / lora.r
    layer.forward = types.MethodType(_forward_with_adapter, layer)


def _forward_with_adapter(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
    return F.linear(x, self.weight, self.bias) + update * self.lora_scaling


def adapter_initial_value(model: nn.Module, name: str, seed: int) -> torch.Tensor:
    """A new adapter's whole value, from (seed, name) alone: A Kaiming-uniform as nn.Linear draws its weight
    (bound 1 / sqrt(in_features)), B zero."""
    shape = model.get_parameter(name).shape
    if name.endswith("lora_B"):
        return torch.zeros(shape)
    bound = 1 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=seeded_generator(seed, name))


def with_new_adapters(first: Initial, seed: int) -> Initial:
    """`first` (an mtnlg.parallel.parallelize.Initial) for the base parameters, new adapters for the rest."""
    return lambda model, name: adapter_initial_value(model, name, seed) if is_adapter(name) else first(model, name)


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its layer's weight (W += alpha / r B A) and remove it: the plain model that
    computes what the adapted one did, for inference and export."""
    for layer in model.modules():
        if hasattr(layer, "lora_A"):
            update = (layer.lora_B.double() @ layer.lora_A.double()) * layer.lora_scaling  # one rounding, not two
            layer.weight += update.to(layer.weight.dtype)
            del layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_scaling, layer.forward
    return model


def merge_checkpoint(src: str | Path, dst: str | Path, *, force: bool = False) -> Path:
    """A LoRA checkpoint's base model with its adapters folded in, written as a whole mtnlg checkpoint."""
    from mtnlg.checkpoint import check_destination, load_config_file, load_model, resolve_checkpoint, save_checkpoint
    from mtnlg.config import FinetuneConfig

    dst = Path(dst)
    check_destination(dst, force)
    checkpoint = resolve_checkpoint(src)
    if not load_config_file(checkpoint).lora.r:
        raise MtnlgError(f"{checkpoint} holds no LoRA adapters (lora.r is 0): it is a whole model already")
    model, tokenizer, config = load_model(checkpoint)  # merged on loading
    config.lora, config.finetune = LoraConfig(), FinetuneConfig()
    return save_checkpoint(dst, model, config, tokenizer)
