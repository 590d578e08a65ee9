"""Pipeline parallelism: cut the one GPT into stages and run them with `torch.distributed.pipelining`.

Every rank builds the whole model on the meta device (no memory) and keeps the stages it runs. A stage is
the same GPT with the parts it does not own removed (see `GPT.forward`), so parameter names stay those of
the whole model; `parallelize` then applies the layout to each stage as to a whole model, and `materialize`
gives the stage memory and the weights the whole model would have had.

The split: `pp * v` stages, v = 2 for interleaved-1f1b (virtual stages) and 1 otherwise. Stages take
contiguous blocks, as equal as can be; when the blocks do not divide evenly the earlier stages take one
more, since the last stage also runs the final norm, the head and the loss. Stage s runs on pipeline rank
s % pp (round-robin, the interleaved layout), so the embeddings live on pp rank 0 and the final norm,
head and loss on pp rank pp - 1.

Between stages the hidden states travel as plain tensors: [micro_batch, seq, d_model], or with sequence
parallelism each tp rank's sequence shard [micro_batch, seq / tp, d_model], sent to the same tp rank of
the next stage; no gather is needed at the boundary. A stage cannot tell the sequence length from a
shard, so every stage is given the positions explicitly.

Each micro-batch's loss is its summed token loss over its share of the step's counted targets; the schedule
divides the gradients by the number of micro-batches (scale_grads), so they are the gradients of the loss
over the step's batch, as in one process (data parallelism's mean over ranks does the rest).

Tied embeddings: the first stage holds `tok_emb.weight`, the last stage `lm_head.weight`, equal at the
start because the last stage initializes its copy as the embedding (`GPT.initial_value`). After each
step's backward their gradients are summed over a two-rank group (the first and last pipeline rank of one
data/tensor-parallel coordinate), so the optimizer makes the same update on both and they stay equal.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from mtnlg.config import LoraConfig
from mtnlg.data.batch import Batch
from mtnlg.hardware import Precision
from mtnlg.model.gpt import GPT
from mtnlg.parallel import whole
from mtnlg.parallel.layout import ParallelDims, stage_layers
from mtnlg.parallel.parallelize import (
    Initial,
    clip_grad_norm_,
    loss_parallel_scope,
    materialize,
    parallel_loss,
    parallelize,
)


def build_stage(model: GPT, layers: range, first: bool, last: bool) -> GPT:
    """A copy of `model` with only `layers`' blocks, the embeddings if `first`, the norm and head if `last`."""
    stage = copy.deepcopy(model)
    stage.blocks = nn.ModuleDict({str(i): stage.blocks[str(i)] for i in layers})
    if not first:
        stage.tok_emb = stage.pos_emb = None
    if not last:
        stage.norm = stage.lm_head = None
    return stage


class Pipeline:
    """This rank's pipeline stages (`modules`, GPT modules) and the schedule that trains them (parallel.pp > 1).

    `model`, built on the meta device, is left as it was: the stages are pruned copies. Per step:
    `step(inputs, targets)`, `clip_grad_norm_(max_norm)`, then the optimizers of the `modules`.
    `is_first` / `is_last`: whether this rank runs the first stage (embeddings) / the last (head, loss).
    """

    def __init__(
        self, model: GPT, dims: ParallelDims, mesh: DeviceMesh, device: torch.device, precision: Precision,
        initial: Initial | None, micro_batch_size: int, lora: LoraConfig | None = None,
    ):
        cfg = dims.cfg
        layers = stage_layers(model.cfg.n_layer, cfg.pp, cfg.pp_schedule)
        n_stages = len(layers)
        self.dims = dims
        self.pp_group = mesh["pp"].get_group()
        pp_rank = mesh["pp"].get_local_rank()
        self.stage_ids = list(range(pp_rank, n_stages, cfg.pp))
        stages = [build_stage(model, layers[s], s == 0, s == n_stages - 1) for s in self.stage_ids]
        self.modules = [materialize(parallelize(stage, dims, mesh, precision, lora), device, initial) for stage in stages]
        self.is_first, self.is_last = pp_rank == 0, pp_rank == cfg.pp - 1
        self.eval_rows = dims.cfg.microbatches * micro_batch_size  # a whole step's rows: the schedule splits them
        pipeline_stages = [
            PipelineStage(stage, s, n_stages, device, group=self.pp_group)
            for s, stage in zip(self.stage_ids, self.modules)
        ]
        if cfg.pp_schedule == "interleaved-1f1b":
            self.schedule = ScheduleInterleaved1F1B(pipeline_stages, cfg.microbatches, loss_fn=self._loss)
        else:
            single = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
            self.schedule = single(pipeline_stages[0], cfg.microbatches, loss_fn=self._loss)
        # A tied embedding that trains is kept equal on both ends; a frozen one (LoRA) needs nothing.
        self.tied_group = self._tied_group(mesh) if model.cfg.tie_embeddings and not (lora and lora.r) else None
        self._denominator = 1.0  # of the micro-batch losses: set per step

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return parallel_loss(logits, targets, self._denominator)

    def _tied_group(self, mesh: DeviceMesh) -> dist.ProcessGroup | None:
        """This rank's group of the first and last pipeline rank of one (dp_replicate, dp_shard, tp)
        coordinate, None on middle ranks. Every rank creates all the groups, in one order."""
        d = self.dims
        grid = mesh.mesh.reshape(d.dp_replicate, d.dp_shard, d.pp, d.tp)
        pairs = [
            [int(grid[r, s, 0, t]), int(grid[r, s, -1, t])]
            for r in range(d.dp_replicate)
            for s in range(d.dp_shard)
            for t in range(d.tp)
        ]
        group, _ = dist.new_subgroups_by_enumeration(pairs)
        return group

    def _tied_weight(self) -> nn.Parameter | None:
        """The tied embedding as this rank holds it: tok_emb on the first stage, lm_head on the last."""
        if self.tied_group is None:
            return None
        return self.modules[0].tok_emb.weight if self.is_first else self.modules[-1].lm_head.weight

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of this rank's stages (the tied embedding on both its first and last rank)."""
        return [p for stage in self.modules for p in stage.parameters()]

    def step(self, batch: Batch, denominator: float) -> torch.Tensor:
        """Forward and backward of this data-parallel rank's batch, in `parallel.microbatches` micro-batches,
        then the tied embedding's gradients summed.

        Every rank of the pipeline passes the same batch and gets back its summed loss over `denominator`
        (computed on the last stage, sent over the pipeline for logging). The schedule divides the gradients
        by the number of micro-batches, so each micro-batch's loss is taken over denominator / microbatches.
        """
        losses: list[torch.Tensor] = []
        self._denominator = denominator / self.dims.cfg.microbatches
        with self._loss_scope():
            self.schedule.step(batch.inputs, target=batch.targets, losses=losses, return_outputs=False,
                               **self._stage_inputs(batch))
        self._sum_tied_grads()
        return self._total_loss(losses, batch.inputs.device)

    @torch.no_grad()
    def evaluate(self, batch: Batch, denominator: float) -> torch.Tensor:
        """`step`'s loss, forward only, on every pipeline rank (put the stages in eval mode first)."""
        losses: list[torch.Tensor] = []
        self._denominator = denominator / self.dims.cfg.microbatches
        with self._loss_scope():
            self.schedule.eval(batch.inputs, target=batch.targets, losses=losses, return_outputs=False,
                               **self._stage_inputs(batch))
        return self._total_loss(losses, batch.inputs.device)

    @torch.no_grad()
    def token_scores(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's log p(target) and whether the target is the argmax (what task evaluation reads),
        forward only: computed on the last stage, sent to every pipeline rank."""
        from mtnlg.eval.scoring import token_scores

        with self._loss_scope():
            logits = self.schedule.eval(inputs, target=targets, losses=[], **self._stage_inputs(Batch(inputs, targets)))
        scores = torch.zeros(2, *targets.shape, device=inputs.device)  # log-probabilities, and greedy as 0/1
        if self.is_last:
            logprobs, greedy = token_scores(logits, targets)
            scores = torch.stack((logprobs, greedy.float()))
        dist.broadcast(scores, group=self.pp_group, group_src=self.dims.pp - 1)
        return scores[0], scores[1].bool()

    def _stage_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Positions (and a packed batch's mask) for every stage, one row per sample so that the schedule splits
        them with the batch (of parallel.microbatches x train.micro_batch_size rows:
        mtnlg.parallel.layout.check_pipeline_batch)."""
        inputs = batch.inputs
        return batch.model_inputs() or {"positions": torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)}

    def _loss_scope(self) -> contextlib.AbstractContextManager:
        """The vocab-parallel loss (and its backward) run inside the schedule: hold the scope around it."""
        return loss_parallel_scope() if self.dims.tp_enabled else contextlib.nullcontext()

    def _total_loss(self, losses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The sum of the micro-batch losses over the schedule's count of them, sent from the last stage."""
        loss = torch.zeros((), device=device)
        if self.is_last:
            loss = torch.stack([whole(x).detach() for x in losses]).sum() / self.dims.cfg.microbatches
        dist.broadcast(loss, group=self.pp_group, group_src=self.dims.pp - 1)
        return loss

    def _sum_tied_grads(self) -> None:
        weight = self._tied_weight()
        if weight is None:
            return
        if isinstance(weight.grad, DTensor):
            # The vocab-parallel embedding's gradient comes out replicated; cut it like the weight (no
            # communication) so both ends of the tie hold the same shard.
            weight.grad = weight.grad.redistribute(placements=weight.placements)
            dist.all_reduce(weight.grad.to_local(), group=self.tied_group)
        else:
            dist.all_reduce(weight.grad, group=self.tied_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm of the whole model, the tied embedding counted once."""
        duplicate = [self._tied_weight()] if self.is_last and self.tied_group is not None else []
        return clip_grad_norm_(self.parameters(), max_norm, pp_group=self.pp_group, uncounted=duplicate)
