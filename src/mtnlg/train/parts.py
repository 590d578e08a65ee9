"""What one rank trains, behind one interface for every layout: its model parts (the whole model, or its
pipeline stages), each with an optimizer, and the schedule that runs a batch through them.

The model is built on the meta device, laid out (tensor/sequence parallel, activation checkpointing, the
compute precision, FSDP or replicas, pipeline stages) and only then given memory, so a rank never holds more
than its own shards plus one whole parameter, and initialized per (seed, parameter name) or from a base
model's weights, so every layout starts from the same weights. The trainer, pretraining or fine-tuning,
calls `train_step`, `evaluate`, `token_scores` and reads `pairs` for checkpoints, whatever the layout.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from mtnlg.config import Config, LoraConfig
from mtnlg.data.batch import Batch
from mtnlg.errors import MtnlgError
from mtnlg.eval.scoring import token_scores
from mtnlg.finetune.contrastive import LanguageModeling, Objective
from mtnlg.hardware import Precision
from mtnlg.model.gpt import GPT
from mtnlg.parallel import whole
from mtnlg.parallel.layout import ParallelDims
from mtnlg.parallel.launch import Distributed
from mtnlg.parallel.parallelize import (
    Initial,
    clip_grad_norm_,
    loss_context,
    materialize,
    parallelize,
)
from mtnlg.parallel.pipeline import Pipeline
from mtnlg.train.optim import build_optimizer


class Schedule(Protocol):
    """How a rank's rows of a batch run through its model parts: `WholeModel`, or `Pipeline` stages.
    `denominator`: what the summed loss of the rows is divided by (`Batch.loss_tokens` of the global batch
    over the data-parallel ranks, whose gradients are averaged)."""

    modules: list[GPT]
    eval_rows: int  # rows of one evaluation forward

    def step(self, batch: Batch, denominator: float) -> torch.Tensor: ...
    def evaluate(self, batch: Batch, denominator: float) -> torch.Tensor: ...
    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor: ...


class WholeModel:
    """The schedule without pipeline stages: the whole model (alone, or tensor/data parallel) runs a rank's
    rows in micro-batches of train.micro_batch_size whose gradients synchronise once, after the last. The
    `objective` turns a micro-batch's output into its loss: next-token, or contrastive over its pairs."""

    def __init__(self, model: GPT, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device,
                 precision: Precision, initial: Initial | None, micro_batch_size: int, compiled: bool = False,
                 lora: LoraConfig | None = None, objective: Objective = LanguageModeling()):
        self.model = materialize(parallelize(model, dims, mesh, precision, lora), device, initial)
        self.modules = [self.model]
        self.micro_batch_size = self.eval_rows = micro_batch_size
        self.forward = torch.compile(self.model) if compiled else self.model
        self.objective = objective

    def _output(self, micro: Batch) -> torch.Tensor:
        return self.forward(micro.inputs, hidden=self.objective.hidden, **micro.model_inputs())

    def step(self, batch: Batch, denominator: float) -> torch.Tensor:
        """Forward and backward; returns the rows' summed loss over `denominator`."""
        micro_batches = batch.split(self.micro_batch_size)
        total = torch.zeros((), device=batch.inputs.device)
        for i, micro in enumerate(micro_batches):
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP, replicas
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            out = self._output(micro)
            with loss_context(out):
                loss = self.objective.loss(out, micro, denominator)
                loss.backward()
            total += whole(loss).detach()
        return total

    @torch.no_grad()
    def evaluate(self, batch: Batch, denominator: float) -> torch.Tensor:
        """`step`'s loss, forward only, in the micro-batches training uses."""
        return sum(whole(self.objective.loss(self._output(micro), micro, denominator))
                   for micro in batch.split(self.micro_batch_size))

    @torch.no_grad()
    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_scores(self.forward(inputs), targets)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.model.parameters(), max_norm)


class ModelParts:
    """This rank's model parts and their optimizers under the run's layout and precision. `initial`: where
    each parameter's first value comes from (`mtnlg.parallel.parallelize.Initial`); None: memory only, for
    a checkpoint to fill (resume). With config.lora.r > 0 the parts carry LoRA adapters and only they train.
    The `objective` is next-token prediction, or (whole model only) contrastive pairs."""

    def __init__(self, config: Config, dist: Distributed, precision: Precision, initial: Initial | None,
                 objective: Objective = LanguageModeling()):
        tc, dims = config.train, dist.dims
        with torch.device("meta"):
            model = GPT(config.model)
        args = (model, dims, dist.mesh, dist.device, precision, initial)
        self.schedule: Schedule = (
            Pipeline(*args, micro_batch_size=tc.micro_batch_size, lora=config.lora) if dims.pp > 1
            else WholeModel(*args, micro_batch_size=tc.micro_batch_size, compiled=tc.compile, lora=config.lora,
                            objective=objective)
        )
        self.modules = self.schedule.modules
        if not all(any(p.requires_grad for p in m.parameters()) for m in self.modules):
            raise MtnlgError(f"a pipeline stage of this rank has no layer that lora.targets ({', '.join(config.lora.targets)}) "
                             "adapts, so it has nothing to train; add targets every stage has, such as q_proj")
        self.optimizers = [build_optimizer(m, tc, fused=dist.device.type == "cuda") for m in self.modules]

    @property
    def pairs(self) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
        """(module, optimizer) of every part: what a checkpoint saves and loads."""
        return list(zip(self.modules, self.optimizers))

    def train_step(self, batch: Batch, denominator: float, lr: float, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's rows of the global batch; returns their summed loss over
        `denominator` and the global gradient norm before clipping."""
        for module, optimizer in self.pairs:
            module.train()
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = self.schedule.step(batch, denominator)
        grad_norm = self.schedule.clip_grad_norm_(max_norm)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def evaluate(self, batch: Batch, denominator: float) -> torch.Tensor:
        """The summed loss of this rank's rows over `denominator`, forward only."""
        self._eval()
        return self.schedule.evaluate(batch, denominator)

    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's log p(target) and whether it is the argmax, for task evaluation."""
        self._eval()
        return self.schedule.token_scores(inputs, targets)

    def _eval(self) -> None:
        for module in self.modules:
            module.eval()
