"""Join the process group `torchrun` describes, and build the run's DeviceMesh.

torchrun (or Slurm via `srun torchrun ...`) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; a plain `mtnlg ...` sets none and runs as one process. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import torch

from mtnlg.config import ParallelConfig
from mtnlg.parallel.layout import MESH_DIMS, ParallelDims

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class Distributed:
    """Where this process stands: its rank, the layout, its mesh (None when running alone), its device."""

    rank: int
    dims: ParallelDims
    mesh: object | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs and writes the files every rank would write the same."""
        return self.rank == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(parallel: ParallelConfig, device: torch.device) -> Distributed:
    """Validate the layout against the launch (before any communication), then join the group and build
    the mesh. A single process with a single-process layout touches no process group at all."""
    import torch.distributed as dist

    dims = ParallelDims(parallel, world_size())
    if dims.cfg.world_size == 1:
        return Distributed(0, dims, None, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dims, build_mesh(dims, device.type), device)


def build_mesh(dims: ParallelDims, device_type: str = "cpu") -> DeviceMesh:
    """One DeviceMesh over all ranks with a named dim for every size > 1 (a size-1 "dp_shard" dim when
    everything is 1), so `mesh["tp"]`, `mesh["dp_shard"]`, ... exist exactly when they are used."""
    from torch.distributed.device_mesh import init_device_mesh

    sizes = dims.sizes()
    names = [name for name in MESH_DIMS if sizes[name] > 1] or ["dp_shard"]
    return init_device_mesh(device_type, tuple(sizes[name] for name in names), mesh_dim_names=tuple(names))


def shutdown() -> None:
    """Leave the process group cleanly, once every rank is done (library use; the CLI uses `leave`)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a process that joined a group. Gloo's threads can abort the interpreter's teardown ("terminate
    called without an active exception") and fail a run that succeeded, so once every rank is done (or
    this one failed) the process exits at once. Measured: 1 bad exit in 6 runs without this, 0 in 25 with it."""
    import torch.distributed as dist

    if code == 0 and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
