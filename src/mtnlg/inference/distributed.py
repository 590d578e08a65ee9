"""Inference with tensor parallelism: one model split over the processes torchrun starts.

Every process reads the whole model (model.safetensors, or state/ when a run wrote no consolidated
file) and `apply_tp` keeps its 1/tp of each layer (heads, hidden units, vocabulary). The processes of one
tp group then make the same generate/stream/score calls in lockstep: every forward communicates inside
the group, and all of them choose the same tokens. When more processes run than tp (evaluation splits its
documents over data-parallel replicas), ranks r*tp ... (r+1)*tp - 1 form replica r, each holding the whole
model split the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.checkpoint import load_config_file, load_model, resolve_checkpoint
from mtnlg.config import Config, ParallelConfig
from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT
from mtnlg.parallel.launch import init_distributed, world_size
from mtnlg.parallel.layout import ParallelDims
from mtnlg.parallel.parallelize import apply_tp
from mtnlg.tokenizer import Tokenizer


def load_tensor_parallel(
    path: str | Path, tp: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer, Config]:
    """Build the checkpoint's model split over `tp` processes; every running process must call this.

    The layout is checked against the launch and the model before any communication or weight loading.
    """
    running = world_size()
    if running % tp:
        raise MtnlgError(
            f"tp {tp} splits the model over {tp} processes, but {running} "
            f"{'is' if running == 1 else 'are'} running; launch a multiple of {tp} with torchrun --nproc-per-node"
        )
    # Decode steps are one token: nothing to split along the sequence. The replicas are only a mesh dim here.
    parallel = ParallelConfig(tp=tp, dp_shard=running // tp, sequence_parallel=False)
    ParallelDims(parallel, running).validate_model(load_config_file(resolve_checkpoint(path)).model)
    dist = init_distributed(parallel, device)
    model, tokenizer, config = load_model(path, dist.device)
    apply_tp(model.to(dtype), dist.mesh["tp"], sequence_parallel=False)
    return model, tokenizer, config
