"""Inference with tensor parallelism: one model split over the processes torchrun starts.

Every process reads the consolidated weights and `parallelize` keeps its 1/tp of each layer (heads,
hidden units, vocabulary). The processes then make the same generate/stream/score calls in lockstep:
every forward communicates inside the tp group, and all of them choose the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.config import Config, ParallelConfig
from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.launch import init_distributed, world_size
from mtnlg.parallel.parallelize import parallelize
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.checkpoint import load_config_file, load_model, resolve_checkpoint


def load_tensor_parallel(
    path: str | Path, tp: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer, Config]:
    """Build the checkpoint's model split over `tp` processes; every one of them must call this.

    The layout is checked against the launch and the model before any communication or weight loading.
    """
    parallel = ParallelConfig(tp=tp, sequence_parallel=False)  # decode steps are one token: nothing to split
    running = world_size()
    if running != tp:
        raise MtnlgError(
            f"tp {tp} splits the model over {tp} processes, but {running} "
            f"{'is' if running == 1 else 'are'} running; launch them with torchrun --nproc-per-node {tp}"
        )
    ParallelDims(parallel, running).validate_model(load_config_file(resolve_checkpoint(path)).model)
    dist = init_distributed(parallel, device)
    model, tokenizer, config = load_model(path, dist.device)
    return parallelize(model.to(dtype), dist.dims, dist.mesh), tokenizer, config
