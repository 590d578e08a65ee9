"""Apply the layout to the one GPT model from outside, with literal plans: tensor and sequence parallelism,
activation checkpointing, the compute precision, data parallelism; then give it memory and its weights.

Order matters and follows torchtitan: the model is built on the meta device; tensor parallel first (DTensor
`parallelize_module`), activation checkpointing per block, then FSDP2 `fully_shard` per block and at the
root (dp_shard, HSDP when dp_replicate is also > 1), or FSDP2's `replicate` when dp_replicate is the only
data-parallel dim; last, `materialize` allocates this rank's shards and initializes them.

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
import functools
import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
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
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from mtnlg.config import LoraConfig
from mtnlg.errors import MtnlgError
from mtnlg.finetune.lora import apply_lora
from mtnlg.hardware import Precision
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.parallel.layout import ParallelDims

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors over the tp group, plain tensors in and out.

    Used for modules that every tp rank computes whole (learned positions, norms without sequence
    parallel): their gradients are already identical on every rank, so no communication is needed. With
    `input_layout` Shard(2), for modules applied to each head alone (Qwen3's q and k norms) on the heads the
    column-parallel projection left this rank: their gradients are partial, and summed over the tp group.
    Making these parameters DTensors keeps all parameters one kind, which foreach AdamW and clipping require.
    """

    def __init__(self, input_layout: Replicate | Shard = Replicate()):
        super().__init__()
        self.input_layout = input_layout

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod, inputs, mesh):
            return tuple(
                DTensor.from_local(x, mesh, (self.input_layout,), run_check=False) if isinstance(x, torch.Tensor) else x
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
        "attn.q_norm": ReplicateParallel(Shard(2)),  # [batch, seq, heads, head_dim]: this rank's heads
        "attn.k_norm": ReplicateParallel(Shard(2)),
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


# Selective recompute keeps the outputs that cost FLOPs (matmuls, attention) or communication (tensor and
# sequence parallel collectives) and recomputes the cheap, memory-hungry rest (norms, activation functions,
# dropout, residual adds) during backward.
_COSTLY = {
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)
} | {
    getattr(torch.ops._c10d_functional, name).default
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")
}


def _keep_costly(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _COSTLY else CheckpointPolicy.PREFER_RECOMPUTE


# Full recompute keeps only each block's input.
_RECOMPUTE = {
    "full": noop_context_fn,
    "selective": functools.partial(create_selective_checkpoint_contexts, _keep_costly),
}


def apply_ac(model: GPT, mode: str) -> None:
    """Activation checkpointing of every block in training (parallel.activation_checkpointing: selective or
    full): each block's forward runs inside torch.utils.checkpoint, which torch.compile traces, bound to the
    block so that the module tree and its parameter names stay as they are."""

    def forward_recomputed(self: nn.Module, *args, **kwargs):
        if not self.training:
            return type(self).forward(self, *args, **kwargs)
        return checkpoint(type(self).forward, self, *args, use_reentrant=False, context_fn=_RECOMPUTE[mode], **kwargs)

    for block in model.blocks.values():
        block.forward = types.MethodType(forward_recomputed, block)


def apply_precision(model: GPT, precision: Precision) -> None:
    """Run the model's forward under the precision's autocast: every layout computes in the same dtype, the
    pipeline's stages included (each stage is a GPT). Bound to the module, so a copy of it keeps it."""
    if not precision.mixed:
        return

    def forward_in_compute_dtype(self: GPT, *args, **kwargs):
        with precision.autocast():
            return type(self).forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward_in_compute_dtype, model)


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, precision: Precision) -> None:
    """FSDP2: one all-gather/reduce-scatter unit per block, and the root (embeddings, norm, head). With a
    bf16 compute dtype, parameters are gathered and computed in it while the sharded master weights, the
    optimizer and the gradient reduction stay in theirs."""
    from torch.distributed.fsdp import fully_shard

    policy = _mixed_precision_policy(precision)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks.values()):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=i < n - 1, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def _mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not precision.mixed:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.reduce)


def apply_replicate(model: GPT, dp_mesh: DeviceMesh, precision: Precision) -> None:
    """Plain data parallel: whole weights on every replica, gradients all-reduced once per step, block by
    block as backward reaches them (one unit per block and the root, as for FSDP).

    FSDP2's `replicate` rather than DDP's reducer: it composes with tensor parallelism (DTensor parameters),
    is told from outside when to synchronise (after a step's last micro-batch, pipeline schedules
    included), and takes the same mixed-precision policy as FSDP."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    policy = _mixed_precision_policy(precision)
    for block in model.blocks.values():
        replicate(block, mesh=dp_mesh, mp_policy=policy)
    replicate(model, mesh=dp_mesh, mp_policy=policy)


def parallelize(
    model: GPT, dims: ParallelDims, mesh: DeviceMesh | None, precision: Precision, lora: LoraConfig | None = None
) -> GPT:
    """Apply the layout in `dims` to `model` (best built on the meta device, then `materialize`d), in place;
    returns it. With parallel.pp > 1, `model` is one pipeline stage (mtnlg.parallel.pipeline cuts the model
    and calls this for each stage). `mesh` is None for a single process. With `lora` (r > 0), LoRA adapters
    go on its target layers after tensor parallelism has split them, so they are split to match."""
    dims.validate_model(model.cfg)
    if dims.pp > 1 and len(model.blocks) == model.cfg.n_layer:
        raise MtnlgError(
            f"parallel.pp is {dims.pp}: build the model with mtnlg.parallel.pipeline.Pipeline, which cuts it into "
            "stages, instead of parallelizing the whole model"
        )
    if dims.tp_enabled:
        apply_tp(model, mesh["tp"], dims.sequence_parallel)
    if lora is not None and lora.r:
        apply_lora(model, lora)
    if dims.cfg.activation_checkpointing != "none":
        apply_ac(model, dims.cfg.activation_checkpointing)
    apply_precision(model, precision)
    if dims.dp_shard > 1:
        dp_names = ("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ("dp_shard",)
        apply_fsdp(model, mesh[dp_names], precision)
    elif dims.dp_replicate > 1:
        apply_replicate(model, mesh["dp_replicate"], precision)
    return model


# Where a parameter's first value comes from: (the module being materialized, the parameter's name) -> its
# whole value on the CPU. `GPT.initial_value` for a new model; a base checkpoint's tensor when fine-tuning.
Initial = Callable[[nn.Module, str], torch.Tensor]


@torch.no_grad()
def materialize(model: GPT, device: torch.device, initial: Initial | None) -> GPT:
    """Memory on `device` and first weights for a model built on the meta device and laid out: each
    parameter's whole value comes from `initial` on the CPU and this rank keeps its piece, so a rank holds
    its shards plus one whole parameter at a time, and every layout starts from the same weights. No
    `initial`: memory only, for weights a checkpoint is about to fill."""
    model.to_empty(device=device)
    if initial is None:
        return model
    for name, param in model.named_parameters():
        value = initial(model, name)
        if isinstance(param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            value = value[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
            param = param.to_local()
        param.copy_(value)
    return model


def new_weights(seed: int) -> Initial:
    """A new model's first weights: `GPT.initial_value`, drawn per (seed, parameter name)."""
    return lambda model, name: model.initial_value(name, seed)


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


def parallel_loss(logits: torch.Tensor, targets: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Next-token loss: the sum over the targets (IGNORE skipped) divided by `denominator`, by default their
    number (the mean). Vocabulary-sharded DTensor logits use a vocab-parallel cross entropy (the softmax max
    and sum are all-reduced, the full logits are never gathered); call `.backward()` inside
    `loss_context(logits)` as well. Plain logits take the model's own `cross_entropy`."""
    if not _vocab_sharded(logits):
        return cross_entropy(logits, targets, denominator)
    with loss_parallel_scope():
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return loss / (denominator or targets.numel())


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
