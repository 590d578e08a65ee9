"""What one rank trains, behind one interface for every layout: its model parts (the whole model, or its
pipeline stages), each with an optimizer, and the schedule that runs a batch through them.

The model is built on the meta device, laid out (tensor/sequence parallel, activation checkpointing, the
compute precision, FSDP or replicas, pipeline stages) and only then given memory, so a rank never holds more
than its own shards plus one whole parameter, and initialized per (seed, parameter name), so every layout
starts from the same weights. The trainer, pretraining or fine-tuning, calls `train_step`, `evaluate`,
`token_scores` and reads `pairs` for checkpoints, whatever the layout.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from mtnlg.config import Config
from mtnlg.eval.scoring import token_scores
from mtnlg.hardware import Precision
from mtnlg.model.gpt import GPT
from mtnlg.parallel import whole
from mtnlg.parallel.layout import ParallelDims
from mtnlg.parallel.launch import Distributed
from mtnlg.parallel.parallelize import clip_grad_norm_, loss_context, materialize, parallel_loss, parallelize
from mtnlg.parallel.pipeline import Pipeline
from mtnlg.train.optim import build_optimizer


class Schedule(Protocol):
    """How a rank's rows of a batch run through its model parts: `WholeModel`, or `Pipeline` stages."""

    modules: list[GPT]
    eval_rows: int  # rows of one evaluation forward

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...
    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...


class WholeModel:
    """The schedule without pipeline stages: the whole model (alone, or tensor/data parallel) runs a rank's
    rows in micro-batches of train.micro_batch_size whose gradients synchronise once, after the last."""

    def __init__(self, model: GPT, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device,
                 precision: Precision, seed: int | None, micro_batch_size: int, compiled: bool = False):
        self.model = materialize(parallelize(model, dims, mesh, precision), device, seed)
        self.modules = [self.model]
        self.micro_batch_size = self.eval_rows = micro_batch_size
        self.forward = torch.compile(self.model) if compiled else self.model

    def _micro_batches(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(inputs.split(self.micro_batch_size), targets.split(self.micro_batch_size)))

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward; returns the mean loss of the rows."""
        micro_batches = self._micro_batches(inputs, targets)
        total = torch.zeros((), device=inputs.device)
        for i, (x, y) in enumerate(micro_batches):
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP, replicas
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            logits = self.forward(x)
            with loss_context(logits):
                loss = parallel_loss(logits, y) / len(micro_batches)
                loss.backward()
            total += whole(loss).detach()
        return total

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The rows' mean loss, forward only, in the micro-batches training uses."""
        micro_batches = self._micro_batches(inputs, targets)
        return sum(whole(parallel_loss(self.forward(x), y)) for x, y in micro_batches) / len(micro_batches)

    @torch.no_grad()
    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_scores(self.forward(inputs), targets)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.model.parameters(), max_norm)


class ModelParts:
    """This rank's model parts and their optimizers under the run's layout and precision. `initialize`:
    draw the initial weights; without it the parts get memory only, for a checkpoint to fill (resume)."""

    def __init__(self, config: Config, dist: Distributed, precision: Precision, initialize: bool = True):
        tc, dims = config.train, dist.dims
        with torch.device("meta"):
            model = GPT(config.model)
        args = (model, dims, dist.mesh, dist.device, precision, tc.seed if initialize else None)
        self.schedule: Schedule = (
            Pipeline(*args, micro_batch_size=tc.micro_batch_size) if dims.pp > 1
            else WholeModel(*args, micro_batch_size=tc.micro_batch_size, compiled=tc.compile)
        )
        self.modules = self.schedule.modules
        self.optimizers = [build_optimizer(m, tc, fused=dist.device.type == "cuda") for m in self.modules]

    @property
    def pairs(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        """(module, optimizer) of every part: what a checkpoint saves and loads."""
        return list(zip(self.modules, self.optimizers))

    def train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, lr: float, max_norm: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's rows of the global batch; returns their mean loss and the global
        gradient norm before clipping."""
        for module, optimizer in self.pairs:
            module.train()
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = self.schedule.step(inputs, targets)
        grad_norm = self.schedule.clip_grad_norm_(max_norm)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of this rank's rows, forward only."""
        self._eval()
        return self.schedule.evaluate(inputs, targets)

    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's log p(target) and whether it is the argmax, for task evaluation."""
        self._eval()
        return self.schedule.token_scores(inputs, targets)

    def _eval(self) -> None:
        for module in self.modules:
            module.eval()
