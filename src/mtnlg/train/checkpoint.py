"""The checkpoint directory, hub of every verb: config.json, model.safetensors, tokenizer.json, plus,
when training wrote it, state/ and trainer_state.pt.

state/ is a torch.distributed.checkpoint (DCP) of the model and optimizer, written by every rank as it
holds them (TP/FSDP shards, pipeline stages) and keyed by parameter name, so a run saved under one
parallel layout resumes under any other, single process included. model.safetensors is the same
weights consolidated into one file for generate, serve and export. trainer_state.pt holds the step,
the data position and the RNG.

Writes go to a temporary directory that is renamed into place, and `latest` moves only after that,
so an interrupted save never becomes the checkpoint a resume picks up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from mtnlg.config import Config
from mtnlg.errors import MtnlgError
from mtnlg.files import write_text_atomic
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"

# What training checkpoints: each model part (the model, or this rank's pipeline stages) with its optimizer.
Parts = list[tuple[nn.Module, torch.optim.Optimizer]]


def save_checkpoint(directory: str | Path, model: nn.Module, config: Config, tokenizer: Tokenizer) -> Path:
    """An inference checkpoint of a whole (single-process) model: config, weights, tokenizer."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_description(tmp, config, tokenizer)
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
    return directory


def _write_description(directory: Path, config: Config, tokenizer: Tokenizer) -> None:
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tokenizer.save(directory)


def save_training_checkpoint(
    directory: Path, parts: Parts, config: Config, tokenizer: Tokenizer, trainer_state: dict[str, Any], is_main: bool
) -> Path:
    """Every rank calls this: each writes its shards of state/; rank 0 writes the rest, consolidates the
    weights into model.safetensors and moves the finished directory into place."""
    import torch.distributed.checkpoint as dcp

    with atomic_directory(directory) if is_main else contextlib.nullcontext(_temporary(directory)) as tmp:
        _barrier()  # rank 0 has made the temporary folder
        state = _state_dicts(parts)
        _name_tied_optimizer_state_twice(parts, state["optim"])
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=tmp / STATE_DIR, no_dist=not _distributed())  # returns once all wrote
        if is_main:
            _write_description(tmp, config, tokenizer)
            torch.save(trainer_state, tmp / TRAINER_STATE)
            consolidate(tmp, config)
    _barrier()  # no rank goes on before the checkpoint is in place
    return directory


def load_training_checkpoint(checkpoint: Path, parts: Parts) -> dict[str, Any]:
    """Load state/ into this rank's model parts and optimizers, however they are laid out now; return
    the trainer state (step, data position, RNG)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (checkpoint / STATE_DIR).is_dir():
        raise MtnlgError(f"{checkpoint} has no {STATE_DIR}/ training state (an imported or exported model?); "
                         "train from it with a fresh --train.out_dir instead of --resume")
    state = _state_dicts(parts)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=checkpoint / STATE_DIR, no_dist=not _distributed())
    for model, optimizer in parts:
        set_model_state_dict(model, state["model"], options=_options())
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options())
    return torch.load(checkpoint / TRAINER_STATE, weights_only=True)


def _state_dicts(parts: Parts) -> dict[str, dict[str, Any]]:
    """Model and optimizer state of all parts, keyed by parameter name (flat), so layouts can differ."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out: dict[str, dict[str, Any]] = {"model": {}, "optim": {}}
    for model, optimizer in parts:
        model_state, optim_state = get_state_dict(model, optimizer, options=_options())
        out["model"].update(model_state)
        out["optim"].update(optim_state)
    return out


def _name_tied_optimizer_state_twice(parts: Parts, optim_state: dict[str, Any]) -> None:
    """A tied embedding is one parameter with two names, and its optimizer state is saved under one of them;
    a pipeline keeps it twice (tok_emb on the first stage, lm_head on the last) and looks up both. Save it
    under both names, so any layout finds it."""
    for model, _ in parts:
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in first_name:
                first_name[id(param)] = name
                continue
            for a, b in ((first_name[id(param)], name), (name, first_name[id(param)])):
                for key in [k for k in optim_state if k.startswith((f"state.{a}.", f"param_groups.{a}."))]:
                    optim_state.setdefault(key.replace(a, b, 1), optim_state[key])


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False: a pipeline stage holds only some of the saved names.
    return StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def consolidate(checkpoint: Path, config: Config) -> None:
    """Write model.safetensors from state/ in this process alone: the whole model, however it was sharded."""
    import torch.distributed.checkpoint as dcp

    with torch.random.fork_rng(devices=[]):  # initializing the model must not move training's RNG
        model = GPT(config.model)
    state = {"model": model.state_dict()}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=checkpoint / STATE_DIR, no_dist=True)
    model.load_state_dict(state["model"])
    tmp = checkpoint / (MODEL_FILE + ".tmp")
    safetensors.torch.save_model(model, str(tmp))
    os.replace(tmp, checkpoint / MODEL_FILE)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists; alone, that is exactly what we mean."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill: on success it replaces `directory`, on failure it vanishes."""
    tmp = _temporary(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def mark_latest(checkpoint: Path) -> None:
    """Point `latest` (a one-line file beside the checkpoints) at `checkpoint`, atomically."""
    write_text_atomic(checkpoint.parent / LATEST, checkpoint.name + "\n")


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step_* checkpoints (0 keeps all), and leftover temporaries."""
    remove_leftovers(checkpoints_dir)
    if keep_last:
        for old in sorted(p for p in checkpoints_dir.glob("step_*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old)


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Delete the temporaries of saves that never finished (a process killed while writing)."""
    for tmp in checkpoints_dir.glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


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
