"""The config of a fine-tuning run: the base model's [model] section, defaults suited to fine-tuning, then
the user's TOML and `--section.key value` overrides, as for `mtnlg train`; BASE and --data over them all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mtnlg.checkpoint import load_config_file, resolve_checkpoint
from mtnlg.config import Config, load_config

# Learning rates in the range the anchors use (peft/TRL examples, litgpt, torchtune): LoRA's adapters start
# at zero and take a larger step than the whole model, which moves away from its pretraining more easily.
FULL_LR, LORA_LR = 2e-5, 2e-4

DEFAULTS: dict[str, dict[str, Any]] = {
    "train": dict(out_dir="runs/finetune", max_steps=100, warmup_steps=10, min_lr_ratio=0.0, weight_decay=0.0,
                  global_batch_size=8, micro_batch_size=8, eval_interval=50, eval_batches=2, save_interval=100),
}


def finetune_config(base: str, data: str, path: str | Path | None, overrides: list[str]) -> Config:
    """The base's model with fine-tuning's defaults under the user's settings; paths are stored absolute, so
    that the checkpoints find their base and data from anywhere."""
    checkpoint = resolve_checkpoint(base)
    defaults = {**DEFAULTS, "model": dataclasses.asdict(load_config_file(checkpoint).model)}
    overrides = [*overrides, f"--finetune.base={checkpoint.resolve()}", f"--finetune.data={Path(data).resolve()}"]
    config = load_config(path, overrides, defaults)
    defaults["train"] = {**DEFAULTS["train"], "lr": LORA_LR if config.lora.r else FULL_LR}
    return load_config(path, overrides, defaults)
