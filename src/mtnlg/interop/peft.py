"""Exchange LoRA adapters with Hugging Face peft, both ways.

An mtnlg LoRA checkpoint holds, per adapted layer, A [r, in] and B [out, r] (`blocks.0.attn.q_proj.lora_A`);
a peft adapter holds the same two matrices per module of the Hugging Face model
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), in the same layout for GPT-2's Conv1D
too (peft's fan_in_fan_out transposes only the merged weight). The module names come from interop.hf's
family tables, so an exported adapter applies to the model `mtnlg export hf` writes from its base, and an
imported one to the base `mtnlg import hf` wrote from the model it was trained on.

A fused Hugging Face module (GPT-2's c_attn: q, k and v stacked along its outputs) has one adapter where
mtnlg has one per projection. Export stacks the projections' A's and places their B's block-diagonally:
rank (adapted parts) x r with alpha scaled alike, so alpha / r and the update stay exactly the same. Import
gives each projection the fused A and its rows of B. Projections sharing one A (an imported adapter) export
it once, with their B's stacked, so a peft adapter survives the round trip tensor for tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from mtnlg.checkpoint import (
    atomic_directory,
    check_destination,
    load_config_file,
    resolve_checkpoint,
    save_adapter_checkpoint,
    tensor_reader,
)
from mtnlg.config import LORA_TARGETS, FinetuneConfig, LoraConfig, ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.finetune.lora import apply_lora, is_adapter
from mtnlg.interop.hf import FAMILIES, Family, export_family, module_map, read_json
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's wrapper (PeftModel.base_model) around the model's own names
_ADAPTER_KEY = re.compile(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight")


def export_peft(src: str | Path, dst: str | Path, *, force: bool = False) -> Path:
    """Write an mtnlg LoRA checkpoint's adapters (or its run's latest) as a peft adapter folder, for
    PeftModel.from_pretrained on the model `mtnlg export hf` writes from its base."""
    dst = Path(dst)
    check_destination(dst, force)
    checkpoint = resolve_checkpoint(src)
    config = load_config_file(checkpoint)
    lora = config.lora
    if not lora.r:
        raise MtnlgError(f"{checkpoint} holds no LoRA adapters (lora.r is 0); export the whole model with mtnlg export hf")
    family = export_family(config.model, checkpoint)
    model, read = _shapes(config.model), tensor_reader(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fan_in_fan_out = False
    for hf, ours, transposed in module_map(family, config.model.n_layer):
        adapted = [n for n in ours if _kind(n) in lora.targets]
        if not adapted:
            continue
        a_parts = [read(f"{n}.lora_A") for n in adapted]
        b_parts = {n: read(f"{n}.lora_B") for n in adapted}
        if len(adapted) == len(ours) and all(torch.equal(a, a_parts[0]) for a in a_parts):
            a, b = a_parts[0], torch.cat([b_parts[n] for n in ours])
        else:  # an unadapted part's rows of B stay zero
            a = torch.cat(a_parts)
            b = torch.block_diag(*[b_parts.get(n, torch.zeros(model.get_submodule(n).out_features, 0)) for n in ours])
        tensors[f"{PREFIX}{hf}.lora_A.weight"], tensors[f"{PREFIX}{hf}.lora_B.weight"] = a, b
        if len(a) != lora.r:
            rank_pattern[hf], alpha_pattern[hf] = len(a), lora.alpha * len(a) / lora.r
        fan_in_fan_out |= transposed
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.finetune.base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": _hf_targets(family, lora.targets),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    with atomic_directory(dst) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return dst


def import_peft(adapter_dir: str | Path, base: str | Path, dst: str | Path, *, force: bool = False) -> Path:
    """Write a peft LoRA adapter, trained on the Hugging Face version of the mtnlg checkpoint `base`, as an mtnlg
    LoRA checkpoint on `base`, which every verb reads as one `mtnlg finetune` wrote."""
    adapter_dir, dst = Path(adapter_dir), Path(dst)
    check_destination(dst, force)
    settings = _read_settings(adapter_dir)
    pairs = _read_pairs(adapter_dir)
    base = resolve_checkpoint(base)
    config = load_config_file(base)
    if config.lora.r:
        raise MtnlgError(f"{base} holds LoRA adapters itself; pass the base model they apply to, or mtnlg merge it first")
    family = export_family(config.model, base)
    model = _shapes(config.model)
    modules = {hf: ours for hf, ours, _ in module_map(family, config.model.n_layer)}
    found: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # mtnlg module -> A, B, alpha
    for hf, (a, b) in pairs.items():
        if hf not in modules:
            raise _no_counterpart(adapter_dir, hf, family, base, config.model.n_layer)
        ours = modules[hf]
        outs = [model.get_submodule(n).out_features for n in ours]
        needs = [len(a), model.get_submodule(ours[0]).in_features], [sum(outs), len(a)]
        if (list(a.shape), list(b.shape)) != needs:
            raise MtnlgError(f"{adapter_dir}: the adapter of {hf} has shapes {list(a.shape)} and {list(b.shape)}, but "
                             f"{base} needs {needs[0]} and {needs[1]}; pass the base it was trained on")
        alpha = _pattern(settings.get("alpha_pattern") or {}, hf, settings.get("lora_alpha", 8))
        for n, part in zip(ours, b.split(outs)):
            found[n] = (a, part, alpha)
    if not found:
        raise MtnlgError(f"{adapter_dir}/{ADAPTER_WEIGHTS} holds no LoRA adapters; save the adapter again")
    # One r and alpha for every layer: the largest rank, the others padded with zeros (which add nothing).
    widest = max(found, key=lambda n: len(found[n][0]))
    r, alpha = len(found[widest][0]), found[widest][2]
    for n, (a, _, their_alpha) in found.items():
        if not math.isclose(their_alpha / len(a), alpha / r):
            raise MtnlgError(
                f"{adapter_dir}: {n} has alpha / r = {their_alpha / len(a):g} but {widest} {alpha / r:g} "
                "(rank_pattern / alpha_pattern); mtnlg's LoRA has one alpha / r, so train with one r and lora_alpha"
            )
    targets = [t for t in LORA_TARGETS if any(_kind(n) == t for n in found)]
    lora = LoraConfig(r=r, alpha=alpha, dropout=settings.get("lora_dropout", 0.0), targets=targets)
    apply_lora(model, lora)  # refuses what this base cannot carry (a tied lm_head)
    state = {}
    for name, param in model.named_parameters():
        if is_adapter(name):
            module, which = name.rsplit(".", 1)
            # A layer the adapter leaves alone (peft's layers_to_transform) gets zeros: rank 0, padded.
            a, b, _ = found.get(module) or (torch.zeros(0, param.shape[1]), torch.zeros(param.shape[0], 0), alpha)
            state[name] = F.pad(a, (0, 0, 0, r - len(a))) if which == "lora_A" else F.pad(b, (0, r - b.shape[1]))
    config.lora, config.finetune = lora, FinetuneConfig(base=str(base.resolve()))
    return save_adapter_checkpoint(dst, state, config, Tokenizer.load(base))


def _read_settings(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, refusing the LoRA variants whose update is not (alpha / r) B A x on linear layers."""
    settings = read_json(adapter_dir / ADAPTER_CONFIG, "a peft adapter folder", "save the adapter again")
    kind, bias = settings.get("peft_type"), settings.get("bias", "none")
    checks = (
        (kind != "LORA", f"peft_type is {kind}; mtnlg imports LORA adapters alone"),
        (settings.get("use_rslora"), "use_rslora scales by alpha / sqrt(r), mtnlg's LoRA by alpha / r; train without it"),
        (settings.get("use_dora"), "use_dora adds magnitude vectors mtnlg's LoRA has no place for; train without it"),
        (bias != "none", f'bias = "{bias}" trains biases, which mtnlg\'s LoRA keeps frozen; train with bias = "none"'),
    )
    for failed, problem in checks:
        if failed:
            raise MtnlgError(f"{adapter_dir / ADAPTER_CONFIG}: {problem}")
    return settings


def _read_pairs(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module -> (A, B) from adapter_model.safetensors, refusing any other tensor."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MtnlgError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; save the adapter with save_pretrained (safetensors)")
    try:
        tensors = safetensors.torch.load_file(path)
    except (OSError, safetensors.SafetensorError) as e:
        raise MtnlgError(f"{path}: unreadable ({e}); save the adapter again") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".base_layer.weight"):
            continue  # peft saves a targeted head's own weight too; the base holds it
        match = _ADAPTER_KEY.fullmatch(key)
        if not match:
            raise MtnlgError(f"{path}: {key} is not a LoRA matrix of a linear layer (lora_A/lora_B.weight), "
                             "which mtnlg's LoRA holds alone; train the adapter without it")
        halves.setdefault(match[1], {})[match[2]] = tensor.float()
    for module, ab in halves.items():
        if len(ab) != 2:
            raise MtnlgError(f"{path}: {module} has lora_{''.join(ab)} without its other half; save the adapter again")
    return {module: (ab["A"], ab["B"]) for module, ab in halves.items()}


def _no_counterpart(adapter_dir: Path, hf: str, family: Family, base: Path, n_layer: int) -> MtnlgError:
    for other in FAMILIES:
        if other.modules != family.modules and any(hf == name for name, _, _ in module_map(other, n_layer)):
            return MtnlgError(f"{adapter_dir}: the adapter is for a {other.architectures[0]} (it adapts {hf}), but "
                              f"{base} is a {family.architectures[0]}; pass the base it was trained on")
    return MtnlgError(f"{adapter_dir}: the adapter adapts {hf}, which {base} ({family.architectures[0]}) has no "
                      f"LoRA counterpart for (those are {', '.join(_hf_targets(family, LORA_TARGETS))}); "
                      "train it on those alone")


def _hf_targets(family: Family, targets: Collection[str]) -> list[str]:
    """peft target_modules for mtnlg's: the HF module names after the layer index, each a distinct suffix."""
    return [hf.split("{i}.")[-1] for hf, ours, _ in family.modules if any(_kind(n) in targets for n in ours)]


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's per-module value (rank_pattern, alpha_pattern): the first key matching the name's tail, else default."""
    return next((v for key, v in patterns.items() if re.match(rf"(.*\.)?({key})$", module)), default)


def _shapes(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]
