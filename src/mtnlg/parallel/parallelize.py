"""Apply tensor, sequence and data parallelism to the one GPT model from outside, with literal plans.

Order matters and follows torchtitan: tensor parallel first (DTensor `parallelize_module`), then
FSDP2 `fully_shard` per block and at the root (dp_shard, HSDP when dp_replicate is also > 1), or
DDP via composable `replicate` when dp_replicate is the only data-parallel dim.

Tensor parallel, Megatron style (per block):
  attn_norm, mlp_norm   SequenceParallel (sequence-sharded; all-gather before, reduce-scatter after)
  q/k/v, up/gate        ColwiseParallel: heads and hidden units split over tp ranks
  o, down               RowwiseParallel: partial sums, reduced (or reduce-scattered with sequence parallel)
and around the blocks:
  tok_emb               RowwiseParallel over the vocabulary (each rank embeds its vocab slice)
  pos_emb               replicated
  norm                  SequenceParallel
  lm_head               ColwiseParallel over the vocabulary, logits stay a DTensor Shard(-1): the loss is
                        computed under `loss_parallel` and the full logits never exist on one rank.
Tied embeddings work because both the row-wise embedding and the col-wise head shard the same
[vocab, d_model] weight on dim 0; the tie is re-made after sharding.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.parallel.dims import ParallelDims


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors over the tp group, plain tensors in and out.

    Used for modules that every tp rank computes whole (learned positions, norms without sequence
    parallel). Their gradients are already identical on every rank, so no communication is needed;
    making them DTensors keeps all parameters one kind, which foreach AdamW and grad clipping require.
    """

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod, inputs, mesh):
            return tuple(
                DTensor.from_local(x, mesh, (Replicate(),), run_check=False) if isinstance(x, torch.Tensor) else x
                for x in inputs
            )

        def to_local(mod, output, mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, mesh, input_fn=to_dtensor, output_fn=to_local)


def block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The tensor-parallel plan of one transformer block, literally."""
    sp = sequence_parallel
    out = Shard(1) if sp else Replicate()  # row-parallel outputs: reduce-scattered along the sequence, or all-reduced
    plan: dict[str, ParallelStyle] = {
        "attn_norm": SequenceParallel() if sp else ReplicateParallel(),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=out),
        "mlp_norm": SequenceParallel() if sp else ReplicateParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=out),
    }
    if sp:  # gather the sequence back before the projections; Attention(x, positions, mask, cache, layer)
        plan["attn"] = PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None, None),
        )
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


def apply_tp(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Tensor (and sequence) parallelism over `tp_mesh`, in place. `model` may be a pipeline stage: modules
    it lacks (None) are skipped, and between stages the hidden states stay plain tensors (with sequence
    parallel: each tp rank's sequence shard), as they are between blocks."""
    sp = sequence_parallel
    learned = model.pos_emb is not None
    # With learned positions the embedding sum is formed whole, then cut along the sequence (no
    # communication) by the embedding dropout's output; with rotary the embedding reduce-scatters directly.
    plan: dict[str, ParallelStyle] = {
        "tok_emb": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sp and not learned else Replicate()
        ),
        "norm": SequenceParallel() if sp else ReplicateParallel(),
        "lm_head": ColwiseParallel(
            input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1), use_local_output=False
        ),
    }
    if learned:
        plan["pos_emb"] = ReplicateParallel()
        if sp:
            plan["emb_dropout"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    parallelize_module(model, tp_mesh, {k: v for k, v in plan.items() if _has(model, k)})
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, {k: v for k, v in block_plan(sp).items() if _has(block, k)})
    if model.cfg.tie_embeddings and model.tok_emb is not None and model.lm_head is not None:
        model.lm_head.weight = model.tok_emb.weight  # sharding replaced both; tie the head back to the embedding


def _has(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: one all-gather/reduce-scatter unit per block, and the root (embeddings, norm, head). With
    `param_dtype` (bf16 on GPUs) parameters are gathered and computed in it while the sharded master
    weights, the optimizer and the gradient reduction stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks.values()):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=i < n - 1, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def apply_ddp(model: GPT, dp_mesh: DeviceMesh, pipeline_stage: bool = False) -> None:
    """Plain data parallel with gradient all-reduce, keeping the module a GPT (composable `replicate`).

    A pipeline stage runs a backward per micro-batch and must all-reduce once, after the last; DDP's
    reducer cannot be told so from outside, so stages use the FSDP2-based `replicate`, which the
    pipeline schedule drives as it drives FSDP."""
    if pipeline_stage:
        from torch.distributed._composable.replicate_with_fsdp import replicate as replicate_stage

        replicate_stage(model, mesh=dp_mesh)
        return
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)


def parallelize(model: GPT, dims: ParallelDims, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> GPT:
    """Apply the tensor and data parallel layout in `dims` to `model` (built with the same seed on every
    rank), in place; returns it. With parallel.pp > 1, `model` is one pipeline stage (mtnlg.parallel.pipeline
    cuts the model and calls this for each stage)."""
    dims.validate_model(model.cfg)
    if dims.pp > 1 and len(model.blocks) == model.cfg.n_layer:
        raise MtnlgError(
            f"parallel.pp is {dims.pp}: build the model with mtnlg.parallel.pipeline.Pipeline, which cuts it into "
            "stages, instead of parallelizing the whole model"
        )
    if dims.tp_enabled:
        apply_tp(model, mesh["tp"], dims.sequence_parallel)
    if dims.dp_shard > 1:
        dp_names = ("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ("dp_shard",)
        apply_fsdp(model, mesh[dp_names], param_dtype)
    elif dims.dp_replicate > 1:  # ParallelDims refused dp_replicate with tp unless dp_shard > 1
        apply_ddp(model, mesh["dp_replicate"], pipeline_stage=dims.pp > 1)
    return model


# -- the training-step pieces that must know about the layout -------------------------------------


_loss_parallel_depth = 0


@contextlib.contextmanager
def loss_parallel_scope():
    """`loss_parallel()` that may nest: torch's switches the vocab-parallel ops off when any exit happens.
    A pipeline holds it over a whole schedule step, whose last stage computes losses and their backward."""
    global _loss_parallel_depth
    if _loss_parallel_depth:
        _loss_parallel_depth += 1
        try:
            yield
        finally:
            _loss_parallel_depth -= 1
        return
    with loss_parallel():
        _loss_parallel_depth = 1
        try:
            yield
        finally:
            _loss_parallel_depth = 0


def loss_context(logits: torch.Tensor):
    """Wrap the loss *and* its backward: vocab-parallel cross entropy when logits are vocabulary-sharded."""
    return loss_parallel_scope() if _vocab_sharded(logits) else contextlib.nullcontext()


def parallel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss. Vocabulary-sharded DTensor logits use a vocab-parallel cross entropy (the
    softmax max and sum are all-reduced, the full logits are never gathered); call `.backward()` inside
    `loss_context(logits)` as well. Plain logits take the model's own `cross_entropy`."""
    if not _vocab_sharded(logits):
        return cross_entropy(logits, targets)
    with loss_parallel_scope():
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _vocab_sharded(logits: torch.Tensor) -> bool:
    return isinstance(logits, DTensor) and any(
        isinstance(p, Shard) and p.dim in (-1, logits.dim() - 1) for p in logits.placements
    )


def clip_grad_norm_(
    parameters: Iterable[nn.Parameter],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
    uncounted: Iterable[nn.Parameter] = (),
) -> torch.Tensor:
    """Clip by the global gradient norm over all ranks; works for plain tensors and DTensors (TP, FSDP).
    With pipeline stages, `parameters` are this rank's, the squared norms of the stages are summed over
    `pp_group`, and `uncounted` parameters are clipped but left out of the norm because another stage
    counts them (a tied embedding's copy on the last stage)."""
    params = [p for p in parameters if p.grad is not None]
    skip = {id(p) for p in uncounted}
    total = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in skip], foreach=True)
    if isinstance(total, DTensor):  # norms of shards are partial: reduce to the true global norm
        total = total.full_tensor()
    if pp_group is not None:
        total = total.square()
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
