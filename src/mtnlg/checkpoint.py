"""The checkpoint directory, hub of every verb: config.json, the weights, tokenizer.json, plus, when
training wrote it, trainer_state.pt (the step, the data position and the RNG).

The weights are state/, model.safetensors, or both, and every verb reads either. state/ is a
torch.distributed.checkpoint (DCP) of the model and optimizer, the only weights a training save writes:
every rank writes what it holds (TP/FSDP shards, pipeline stages) keyed by parameter name, so a run saved
under one parallel layout resumes under any other, single process included, and no host ever gathers
the whole model. model.safetensors is the weights alone in one file, as `mtnlg import` writes them; a run
writes it only when train.consolidate asks (by default at its last save), and `mtnlg consolidate` writes
it from state/ later, tensor by tensor.

Writes go to a temporary directory that is renamed into place, and `latest` moves only after that,
so an interrupted save never becomes the checkpoint a resume picks up. A full disk is one error line,
and the checkpoint before stays `latest`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from mtnlg.config import Config, LoraConfig, ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.files import atomic_file, write_text_atomic
from mtnlg.model.flops import human, model_size
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer

if TYPE_CHECKING:
    from mtnlg.parallel.parallelize import Initial

MODEL_FILE = "model.safetensors"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"

# What training checkpoints: each model part (the model, or this rank's pipeline stages) with its optimizer.
Parts = list[tuple[nn.Module, torch.optim.Optimizer]]

# A tied embedding is one tensor with two names; state/ holds it under both, model.safetensors under the
# first alone, as safetensors.torch.save_model writes it (it keeps the alphabetically first name and
# records the other in the header's metadata), so load_model ties it back.
TIED_KEPT, TIED_DROPPED = "lm_head.weight", "tok_emb.weight"

# The dtypes a model's weights come in, by their safetensors names.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# DCP's framing per parameter name in state/, measured with torch 2.13: ~1.5 KB of torch.save framing for each
# of 4 tensors (weight, 2 moments, step), ~1.3 KB for each of AdamW's 11 pickled param-group values, and
# ~0.2 KB of metadata per entry. Only tiny models notice it.
DCP_BYTES_PER_NAME = 23_000


def save_checkpoint(directory: str | Path, model: nn.Module, config: Config, tokenizer: Tokenizer) -> Path:
    """An inference checkpoint of a whole (single-process) model: config, weights, tokenizer."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_description(tmp, config, tokenizer)
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
    return directory


def save_adapter_checkpoint(
    directory: str | Path, adapters: dict[str, torch.Tensor], config: Config, tokenizer: Tokenizer
) -> Path:
    """An inference checkpoint of LoRA adapters (config.lora, config.finetune.base naming their base): the
    adapters in state/ as a training save holds them, so every verb reads it as one `mtnlg finetune` wrote."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _write_description(tmp, config, tokenizer)
        with _quiet_single_process():
            dcp.save({"model": adapters}, checkpoint_id=tmp / STATE_DIR, no_dist=True)
    return directory


def check_destination(dst: Path, force: bool) -> None:
    """A verb writing a new checkpoint or model folder refuses to mix it into another, unless told to replace it."""
    if not force and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MtnlgError(f"{dst} already exists and is not empty; choose a new folder or pass --force to replace it")


def _write_description(directory: Path, config: Config, tokenizer: Tokenizer) -> None:
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tokenizer.save(directory)


def save_training_checkpoint(
    directory: Path,
    parts: Parts,
    config: Config,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any],
    is_main: bool,
) -> Path:
    """Every rank calls this: each writes its shards of state/; rank 0 writes the rest and moves the
    finished directory into place. A full disk, met on any rank, is the same one-line MtnlgError on every
    rank, and leaves no temporary folder behind."""
    import torch.distributed.checkpoint as dcp

    needs = checkpoint_bytes(config.model)
    disk_full = False
    try:
        with atomic_directory(directory) if is_main else contextlib.nullcontext(_temporary(directory)) as tmp:
            _barrier()  # rank 0 has made the temporary folder
            state = _state_dicts(parts)
            _name_tied_optimizer_state_twice(parts, state["optim"])
            with _quiet_single_process():
                # Returns once all ranks wrote; when one fails, every rank raises its CheckpointException.
                dcp.save(state, checkpoint_id=tmp / STATE_DIR, no_dist=not _distributed())
            if is_main:
                _write_description(tmp, config, tokenizer)
                with open(tmp / TRAINER_STATE, "wb") as f:  # given a path, torch.save calls a full disk a RuntimeError
                    torch.save(trainer_state, f)
    except (OSError, RuntimeError, dcp.CheckpointException) as e:
        if not _is_disk_full(e, directory.parent, needs):
            raise
        disk_full = True
    # Rank 0's outcome, on every rank: it alone writes after DCP. Also keeps every rank here until the
    # checkpoint is in place.
    if _from_main(disk_full):
        raise MtnlgError(
            f"no space left on the disk of {directory.parent} for a checkpoint (one takes about {human(needs, 'B')}, "
            f"{human(shutil.disk_usage(directory.parent).free, 'B')} are free); free space there, or point "
            "--train.out_dir at a disk with room"
        )
    return directory


def checkpoint_bytes(model_cfg: ModelConfig, consolidated: bool = False, lora: LoraConfig | None = None) -> int:
    """About the bytes one training checkpoint of this model takes on disk (within a few %): fp32 weights and
    AdamW's two fp32 moments and step for every trained parameter name (a tied embedding's two names each hold
    all of them; with `lora`, the adapters alone), plus DCP's framing; with `consolidated`, model.safetensors too
    (never written beside adapters)."""
    adapters = lora is not None and lora.r > 0
    with torch.device("meta"):  # shapes only
        model = GPT(model_cfg)
        if adapters:
            from mtnlg.finetune.lora import apply_lora

            apply_lora(model, lora)
    trained = [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    state = sum(3 * 4 * p.numel() + 4 + DCP_BYTES_PER_NAME for p in trained)
    return state + (4 * model_size(model_cfg).params if consolidated and not adapters else 0)


def _is_disk_full(error: BaseException, directory: Path, needs: int) -> bool:
    """ENOSPC (or a quota's EDQUOT), raised here or by any rank inside DCP, which gathers every rank's failure;
    or torch.save's zip writer (which DCP uses) failing where fewer than `needs` bytes are free: it reports a
    full disk as a RuntimeError, "unexpected pos"."""
    import torch.distributed.checkpoint as dcp

    if isinstance(error, dcp.CheckpointException):
        return any(_is_disk_full(failure, directory, needs) for failure, _ in error.failures.values())
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "unexpected pos" in str(error) and shutil.disk_usage(directory).free < needs


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
        # Frozen parameters (a LoRA run's base weights) are left out: its checkpoints hold the adapters and
        # their optimizer state alone. (DCP's ignore_frozen_params keeps a tied one's second name.)
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        out["model"].update({k: v for k, v in model_state.items() if k not in frozen})
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

    # strict=False: a pipeline stage holds only some of the saved names, a LoRA run only its adapters.
    return StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def consolidate_from_main(checkpoint: Path, is_main: bool) -> None:
    """Rank 0 writes model.safetensors into a finished checkpoint while the others wait (they do nothing
    collective meanwhile). A failure, such as a full disk, is the same MtnlgError on every rank and leaves
    the checkpoint as it was: complete, with state/ alone."""
    error = None
    if is_main:
        try:
            consolidate(checkpoint)
        except MtnlgError as e:
            error = str(e)
    error = _from_main(error)
    if error:
        raise MtnlgError(error)


def consolidate(checkpoint: Path) -> Path:
    """Write model.safetensors from state/, one tensor in memory at a time; return its path."""
    if load_config_file(checkpoint).lora.r:
        raise MtnlgError(f"{checkpoint} holds LoRA adapters, not a whole model; mtnlg merge writes the base model with "
                         "them folded in")
    if not (checkpoint / STATE_DIR).is_dir():
        raise MtnlgError(f"{checkpoint} has no {STATE_DIR}/ to consolidate; its weights are already in {MODEL_FILE}")
    try:
        return _write_consolidated(checkpoint)
    except (OSError, RuntimeError) as e:
        needs = 4 * model_size(load_config_file(checkpoint).model).params
        if not _is_disk_full(e, checkpoint, needs):
            raise
        raise MtnlgError(
            f"no space left on the disk of {checkpoint} for {MODEL_FILE} (about {human(needs, 'B')}); free space there"
        ) from None


def _write_consolidated(checkpoint: Path) -> Path:
    """Stream the model's tensors from state/ into a safetensors file: the header, then each tensor's bytes,
    read through DCP (so whatever layout wrote them) and written before the next is read.

    DCP reads a tensor into memory of its own and copies it into the one asked for, so the peak is twice
    the largest tensor: each is read into one buffer of the largest's size, and the largest goes first,
    before smaller reads can leave the heap fragmented under it."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(checkpoint / STATE_DIR)
    tensors = _state_tensors(reader)
    tied = load_config_file(checkpoint).model.tie_embeddings
    if tied:
        tensors.pop(TIED_DROPPED)
    order = sorted(tensors, key=lambda name: (-_nbytes(*tensors[name]), name))
    header: dict[str, Any] = {"__metadata__": {TIED_DROPPED: TIED_KEPT}} if tied else {}
    offset = 0
    for name in order:
        shape, dtype = tensors[name]
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    buffer = torch.empty(_nbytes(*tensors[order[0]]), dtype=torch.uint8)
    path = checkpoint / MODEL_FILE
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in order:
            shape, dtype = tensors[name]
            data = buffer[: _nbytes(shape, dtype)]
            _read_state_tensor(reader, name, data.view(dtype).view(shape))
            f.write(data.numpy())  # the host's bytes: little-endian, as the format is
    return path


def _read_state_tensor(reader, name: str, into: torch.Tensor) -> torch.Tensor:
    """The model tensor `name` of state/ read into `into` (of its shape and dtype), whatever layout wrote it."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.load({f"model.{name}": into}, storage_reader=reader, no_dist=True)
    return into


def _state_tensors(reader) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of the model's tensors in state/."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = reader.read_metadata().state_dict_metadata
    return {
        name.removeprefix("model."): (meta.size, meta.properties.dtype)
        for name, meta in entries.items()
        if name.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }


def _nbytes(shape: torch.Size, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


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


def _from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank (every rank waits for it)."""
    if not _distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _has_weights(checkpoint: Path) -> bool:
    """model.safetensors, or a complete state/ (DCP writes its .metadata last)."""
    return (checkpoint / MODEL_FILE).is_file() or (checkpoint / STATE_DIR / ".metadata").is_file()


def find_latest(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST
    if not pointer.is_file():
        return None
    checkpoint = checkpoints_dir / pointer.read_text().strip()
    return checkpoint if _has_weights(checkpoint) else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a folder of checkpoints with `latest`, or a training run directory."""
    path = Path(path)
    if _has_weights(path):
        return path
    for candidate in (path, path / "checkpoints"):
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    if not path.exists():
        raise MtnlgError(f"{path}: no such checkpoint or run directory; pass a run directory written by `mtnlg train`")
    raise MtnlgError(
        f"{path}: no checkpoint found (no {MODEL_FILE} or {STATE_DIR}/, no checkpoints/{LATEST}); train or import first"
    )


def load_config_file(checkpoint: Path) -> Config:
    try:
        return Config.from_dict(json.loads((checkpoint / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise MtnlgError(f"{checkpoint}/config.json is unreadable ({e}); the checkpoint is incomplete") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, Config]:
    """Build the model a checkpoint describes and load its weights (ready for eval). The model gets memory
    but no initial values (every tensor comes from the checkpoint), so it is held once. A LoRA checkpoint
    holds adapters alone: its base model's weights are read too, and the adapters merged into them."""
    checkpoint = resolve_checkpoint(path)
    config = load_config_file(checkpoint)
    with torch.device("meta"):
        model = GPT(config.model)
    if config.lora.r:
        from mtnlg.finetune.lora import apply_lora, is_adapter, merge_lora
        from mtnlg.parallel.parallelize import materialize

        apply_lora(model, config.lora)
        base, adapters = tensor_reader(base_of(checkpoint, config)), tensor_reader(checkpoint)
        merge_lora(materialize(model, device, lambda _, name: (adapters if is_adapter(name) else base)(name)))
    else:
        model.to_empty(device=device)
        load_weights(model, checkpoint)
    return model.eval(), Tokenizer.load(checkpoint), config


def base_of(checkpoint: Path, config: Config) -> Path:
    """The base model a fine-tuned (LoRA) checkpoint's adapters apply to."""
    try:
        return resolve_checkpoint(config.finetune.base)
    except MtnlgError:
        raise MtnlgError(f"{checkpoint} holds LoRA adapters for the base model {config.finetune.base} (finetune.base "
                         "in its config.json), which is not there; put it back, or point finetune.base at a copy") from None


def tensor_reader(checkpoint: Path) -> Callable[[str], torch.Tensor]:
    """A function reading one tensor of a checkpoint's model by name, whole and on the CPU, from its
    model.safetensors or else its state/: what fine-tuning starts from, one tensor in memory at a time."""
    if (checkpoint / MODEL_FILE).is_file():
        weights = safetensors.safe_open(str(checkpoint / MODEL_FILE), "pt")
        names = set(weights.keys())

        def read(name: str) -> torch.Tensor:
            name = TIED_KEPT if name == TIED_DROPPED and name not in names else name
            if name not in names:
                raise MtnlgError(f"{checkpoint / MODEL_FILE} has no tensor {name}; the checkpoint does not hold the "
                                 "model its config.json describes")
            return weights.get_tensor(name)

        return read
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(checkpoint / STATE_DIR)
    tensors = _state_tensors(reader)

    def read_state(name: str) -> torch.Tensor:
        if name not in tensors:
            raise MtnlgError(f"{checkpoint / STATE_DIR} has no tensor {name}; the checkpoint does not hold the "
                             "model its config.json describes")
        return _read_state_tensor(reader, name, torch.empty(tensors[name][0], dtype=tensors[name][1]))

    return read_state


def base_weights(checkpoint: Path) -> Initial:
    """A base model's weights as the first values of a model to train (fine-tuning, continued pretraining)."""
    read = tensor_reader(checkpoint)

    def first_value(model: nn.Module, name: str) -> torch.Tensor:
        value, shape = read(name), model.get_parameter(name).shape
        if value.shape != shape:
            raise MtnlgError(f"{name} is {list(value.shape)} in the base model {checkpoint} but {list(shape)} in this "
                             "run's [model]; keep the base's shape (its config.json) and change only dropout")
        return value

    return first_value


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Every tensor of `model` from the checkpoint's model.safetensors, or else from its state/."""
    if not (checkpoint / MODEL_FILE).is_file():
        _load_state_weights(model, checkpoint)
        return
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(checkpoint / MODEL_FILE), strict=False)
    except (OSError, safetensors.SafetensorError, RuntimeError) as e:
        raise MtnlgError(f"{checkpoint / MODEL_FILE} is unreadable ({e}); the checkpoint is corrupt, use another") from None
    if missing or unexpected:
        raise MtnlgError(
            f"{checkpoint / MODEL_FILE} does not match config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the checkpoint is inconsistent"
        )


def _load_state_weights(model: nn.Module, checkpoint: Path) -> None:
    """DCP reads state/'s `model.` tensors straight into the model's own (a tied tensor twice, harmlessly)."""
    import torch.distributed.checkpoint as dcp

    try:
        with _quiet_single_process():
            dcp.load({"model": model.state_dict()}, checkpoint_id=checkpoint / STATE_DIR, no_dist=True)
    except dcp.CheckpointException as e:
        reason = " ".join(str(next(iter(e.failures.values()))[0]).split())  # DCP's missing key or size mismatch
        raise MtnlgError(
            f"{checkpoint / STATE_DIR} does not hold this config.json's model ({reason}); the checkpoint is inconsistent"
        ) from None
