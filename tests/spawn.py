"""Run a test function on N local gloo processes, started the way torchrun starts them.

The processes fork from a server that imported torch and mtnlg once ("forkserver"), rather than each
importing them anew ("spawn"): starting four took 4.3-4.7 s spawned and 0.1 s forked. A forked process
would keep the server's environment, so each takes the caller's environment as it is at the call.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtnlg.parallel.launch import leave

mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "mtnlg.cli", "mtnlg.train.trainer",
                                                     "mtnlg.parallel.launch", "spawn"])


def spawn(fn: Callable[..., None], world: int, *args) -> None:
    """Call fn(rank, *args) on `world` processes with torchrun's environment; fn joins the group itself
    (init_process_group("gloo"), or mtnlg code that does). Raises if any process fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_run, args=(fn, world, port, args, dict(os.environ)), nprocs=world, join=True,
                       start_method="forkserver")


def _run(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple, environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    leave(0)
