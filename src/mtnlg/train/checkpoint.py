"""The checkpoint directory, hub of every verb: config.json, model.safetensors, tokenizer.json,
plus optimizer.pt and trainer_state.pt when training wrote it.

Writes go to a temporary directory that is renamed into place, and `latest` moves only after that,
so an interrupted save never becomes the checkpoint a resume picks up.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from mtnlg.config import Config
from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
LATEST = "latest"


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    config: Config,
    tokenizer: Tokenizer,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        tokenizer.save(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
    return directory


@contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill: on success it replaces `directory`, on failure it vanishes."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mark_latest(checkpoint: Path) -> None:
    """Point `latest` (a one-line file beside the checkpoints) at `checkpoint`, atomically."""
    tmp = checkpoint.parent / (LATEST + ".tmp")
    tmp.write_text(checkpoint.name + "\n")
    os.replace(tmp, checkpoint.parent / LATEST)


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step_* checkpoints (0 keeps all), and leftover temporaries."""
    for tmp in checkpoints_dir.glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if keep_last:
        for old in sorted(p for p in checkpoints_dir.glob("step_*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old)


def find_latest(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST
    if not pointer.is_file():
        return None
    checkpoint = checkpoints_dir / pointer.read_text().strip()
    return checkpoint if (checkpoint / MODEL_FILE).is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a folder of checkpoints with `latest`, or a training run directory."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    if not path.exists():
        raise MtnlgError(f"{path}: no such checkpoint or run directory; pass a run directory written by `mtnlg train`")
    raise MtnlgError(f"{path}: no checkpoint found (no {MODEL_FILE}, no checkpoints/{LATEST}); train or import first")


def load_config_file(checkpoint: Path) -> Config:
    try:
        return Config.from_dict(json.loads((checkpoint / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise MtnlgError(f"{checkpoint}/config.json is unreadable ({e}); the checkpoint is incomplete") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, Config]:
    """Build the model a checkpoint describes and load its weights (ready for eval)."""
    checkpoint = resolve_checkpoint(path)
    config = load_config_file(checkpoint)
    with torch.device(device):
        model = GPT(config.model)
    load_weights(model, checkpoint)
    return model.eval(), Tokenizer.load(checkpoint), config


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(checkpoint / MODEL_FILE), strict=False)
    except (OSError, safetensors.SafetensorError, RuntimeError) as e:
        raise MtnlgError(f"{checkpoint / MODEL_FILE} is unreadable ({e}); the checkpoint is corrupt, use another") from None
    if missing or unexpected:
        raise MtnlgError(
            f"{checkpoint / MODEL_FILE} does not match config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the checkpoint is inconsistent"
        )
