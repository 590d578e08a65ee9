"""A dry run at full scale: the real parallelized model, built as chosen ranks of a cluster that is not here.

PyTorch's fake process group lets this one process be rank r of thousands: the DeviceMesh, tensor
parallelism, FSDP and replicas are applied as on the cluster, to a model on the meta device (shapes, no memory).
What a rank would hold is then read off its parameters and optimizer state, and the tensor-parallel
collectives of one micro-batch are counted by running its forward and backward on meta tensors. Data-parallel
and pipeline traffic follow from the shapes: FSDP and replicas refuse to run on the meta device.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from mtnlg.config import Config, ModelConfig, ParallelConfig, TrainConfig
from mtnlg.errors import MtnlgError
from mtnlg.hardware import Precision
from mtnlg.model.gpt import GPT
from mtnlg.parallel.launch import build_mesh
from mtnlg.parallel.layout import ParallelDims, stage_layers
from mtnlg.parallel.parallelize import parallelize
from mtnlg.parallel.pipeline import build_stage
from mtnlg.parallel.planner import Layout, rank_state_bytes
from mtnlg.train.optim import build_optimizer


@dataclass
class RankReport:
    rank: int
    coordinates: dict[str, int]
    stages: list[int]
    blocks: list[int]
    params: int
    state_bytes: dict[str, int]  # keyed as mtnlg.model.flops.TRAINING_BYTES_PER_PARAM
    collectives: dict[str, list[int]] = field(default_factory=dict)  # kind -> [count, bytes] per step

    @property
    def total_state_bytes(self) -> int:
        return sum(self.state_bytes.values())


def dry_run(config: Config, world_size: int, ranks: list[int], seq: int) -> list[RankReport]:
    """Build `config`'s layout as each of `ranks` of `world_size` and report what one training step holds
    and sends there with sequences of `seq` tokens (bf16 compute with fp32 master weights, as on GPUs).
    Each rank is a fresh process: a process group, and the meshes torch caches for it, cannot be made
    twice in one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    reports = []
    for rank in ranks:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            reports.append(pool.submit(_one_rank, config, world_size, rank, seq).result())
    return reports


def _one_rank(config: Config, world_size: int, rank: int, seq: int) -> RankReport:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dims = ParallelDims(config.parallel, world_size)
    precision = Precision.for_training("bf16", torch.device("cpu"))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = build_mesh(dims, "cpu")
        n_stages = len(stage_layers(config.model.n_layer, dims.pp, dims.cfg.pp_schedule)) if dims.pp > 1 else 1
        stage_ids = list(range(dims.coordinates(rank)["pp"], n_stages, dims.pp))
        stages = _stages(config, dims, mesh, precision, stage_ids)
        params = sum(_local(p).numel() for stage in stages for p in stage.parameters())
        gradient_bytes, optimizer_bytes = _step_state_bytes(stages, config)
        report = RankReport(
            rank=rank,
            coordinates=dims.coordinates(rank),
            stages=stage_ids,
            blocks=[int(b) for stage in stages for b in stage.blocks],
            params=params,
            state_bytes={
                "bf16 weights": params * precision.compute.itemsize,  # the copy autocast (or FSDP's gather) makes
                "fp32 gradients": gradient_bytes,
                "fp32 master weights": sum(_local(p).nbytes for stage in stages for p in stage.parameters()),
                "fp32 Adam moments": optimizer_bytes,
            },
        )
        report.collectives = _collectives(config, dims, mesh, precision, stage_ids, stages, seq)
        return report
    finally:
        dist.destroy_process_group()


def _stages(config: Config, dims: ParallelDims, mesh: DeviceMesh, precision: Precision, stage_ids: list[int],
            data_parallel: bool = True) -> list[GPT]:
    """The pipeline stages `stage_ids` as training lays them out, on the meta device; without `data_parallel`,
    the same stages with tensor parallelism only (what can run a forward on meta tensors)."""
    if not data_parallel:
        dims = ParallelDims(dataclasses.replace(dims.cfg, dp_shard=1, dp_replicate=1), dims.tp * dims.pp)
    with torch.device("meta"):
        model = GPT(config.model)
    if dims.pp == 1:
        return [parallelize(model, dims, mesh, precision)]
    layers = stage_layers(config.model.n_layer, dims.pp, dims.cfg.pp_schedule)
    return [
        parallelize(build_stage(model, layers[s], s == 0, s == len(layers) - 1), dims, mesh, precision)
        for s in stage_ids
    ]


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _step_state_bytes(stages: list[GPT], config: Config) -> tuple[int, int]:
    """The gradients (as autograd makes them: each parameter's shape and dtype) and AdamW's state as one
    step on them creates it, on the meta parameters."""
    gradients = moments = 0
    for stage in stages:
        optimizer = build_optimizer(stage, config.train)
        for p in stage.parameters():
            p.grad = torch.zeros_like(p)
            gradients += _local(p.grad).nbytes
        optimizer.step()
        moments += sum(_local(v).nbytes for state in optimizer.state.values() for k, v in state.items() if k != "step")
        stage.zero_grad(set_to_none=True)
    return gradients, moments


class _CountCollectives(TorchDispatchMode):
    """Count the collectives that DTensor issues (functional c10d ops), with the bytes of their inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and not func.__name__.startswith(("wait_tensor", "_wrap_tensor")):
            kind = func.__name__.split(".")[0]
            self.counts[kind] += 1
            self.bytes[kind] += sum(a.nbytes for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _collectives(config: Config, dims: ParallelDims, mesh: DeviceMesh, precision: Precision, stage_ids: list[int],
                 stages: list[GPT], seq: int) -> dict[str, list[int]]:
    """One step's traffic from this rank: tensor-parallel collectives counted over one micro-batch's forward
    and backward in the compute dtype (times the step's micro-batches), pipeline sends from the activation
    shape, and the data-parallel collectives from the units FSDP or replicate made (each block, and the
    rest of the stage), which they issue per unit."""
    tc, pc, cfg = config.train, dims.cfg, config.model
    micro_batches = pc.microbatches if dims.pp > 1 else tc.global_batch_size // dims.dp_size // tc.micro_batch_size
    out: dict[str, list[int]] = {}
    if dims.tp_enabled:
        # Autocast does not act on meta tensors: weights in the compute dtype stand in for it.
        tp_only = _stages(config, dims, mesh, precision, stage_ids, data_parallel=False)
        count = _CountCollectives()
        with count:
            for s, stage in zip(stage_ids, tp_only):
                stage.to(precision.compute)
                rows = seq // dims.tp if dims.sequence_parallel and s != 0 else seq
                x = (torch.zeros(tc.micro_batch_size, seq, dtype=torch.long, device="meta") if s == 0 else
                     torch.zeros(tc.micro_batch_size, rows, cfg.d_model, device="meta", dtype=precision.compute,
                                 requires_grad=True))
                positions = torch.arange(seq, device="meta").expand(tc.micro_batch_size, seq)
                y = stage(x, positions)
                (y.to_local() if hasattr(y, "to_local") else y).float().sum().backward()
        for kind in count.counts:
            out[f"tp {kind}"] = [count.counts[kind] * micro_batches, count.bytes[kind] * micro_batches]
    if dims.pp > 1:  # each micro-batch's activations forward and their gradients back, per stage boundary
        rows = seq // dims.tp if dims.sequence_parallel else seq
        boundary = tc.micro_batch_size * rows * cfg.d_model * precision.compute.itemsize
        last = dims.pp * len(stage_ids) - 1
        sends = sum((s != last) + (s != 0) for s in stage_ids)  # activations on, gradients back
        out["pp send"] = [sends * micro_batches, sends * micro_batches * boundary]
    units = [n * dims.dp_shard for stage in stages for n in _unit_params(stage)]  # whole-unit parameters
    if dims.dp_shard > 1:
        # every micro-batch gathers each unit for forward and again for backward (all but the last block,
        # kept gathered); the gradients are reduce-scattered once per step
        gathered = 2 * sum(units) - sum(_unit_params(stage)[-2] * dims.dp_shard for stage in stages)
        out["dp all_gather_into_tensor"] = [(2 * len(units) - len(stages)) * micro_batches,
                                            gathered * precision.compute.itemsize * micro_batches]
        out["dp reduce_scatter_tensor"] = [len(units), sum(units) * precision.reduce.itemsize]
    if dims.dp_replicate > 1:  # once per step, per unit; between shards of a unit under HSDP
        out["dp all_reduce"] = [len(units), sum(units) // dims.dp_shard * precision.reduce.itemsize]
    return out


def _unit_params(stage: GPT) -> list[int]:
    """Parameters this rank holds of each data-parallel unit: the blocks in order, then the rest (the root)."""
    blocks = [sum(_local(p).numel() for p in block.parameters()) for block in stage.blocks.values()]
    return [*blocks, sum(_local(p).numel() for p in stage.parameters()) - sum(blocks)]


def pick_ranks(dims: ParallelDims) -> list[int]:
    """Ranks worth checking: the first, a middle and the last pipeline stage (tp, dp coordinates 0), or rank 0."""
    per_stage = dims.tp
    stages = sorted({0, dims.pp // 2, dims.pp - 1})
    return [s * per_stage for s in stages]


def format_report(reports: list[RankReport], planned: dict[int, dict[str, int]]) -> str:
    """Each checked rank's state beside the planner's figure for it, and its step's collectives."""
    GiB = 2**30
    lines = []
    for r in reports:
        want = sum(planned[r.rank].values())
        diff = abs(r.total_state_bytes - want) / want
        where = ", ".join(f"{k} {v}" for k, v in r.coordinates.items())
        stages = ",".join(map(str, r.stages))
        lines.append(f"rank {r.rank} ({where}; stage {stages}, blocks {r.blocks[0]}-{r.blocks[-1]}): {r.params:,} parameters")
        for what, nbytes in r.state_bytes.items():
            lines.append(f"  {what:<20} {nbytes / GiB:8.2f} GiB   planner {planned[r.rank][what] / GiB:8.2f} GiB")
        lines.append(f"  {'state':<20} {r.total_state_bytes / GiB:8.2f} GiB   planner {want / GiB:8.2f} GiB"
                     f"   ({100 * diff:.2f}% apart)")
        for kind, (count, nbytes) in sorted(r.collectives.items()):
            lines.append(f"  {kind:<28} x{count:<6} {nbytes / GiB:8.2f} GiB per step")
    return "\n".join(lines)


def within(reports: list[RankReport], planned: dict[int, dict[str, int]], tolerance: float = 0.01) -> bool:
    return all(math.isclose(r.total_state_bytes, sum(planned[r.rank].values()), rel_tol=tolerance) for r in reports)


def check_layout(model_cfg: ModelConfig, layout: Layout, gpus: int, global_batch: int, seq: int) -> str:
    """The dry run of a planned layout (data parallel as replicas, the planner's reading of dp) on its first,
    middle and last pipeline stage, beside the planner's figures; MtnlgError when they are over 1% apart."""
    micro_batches = global_batch // (layout.dp * layout.micro_batch)
    config = Config(
        model=model_cfg,
        train=TrainConfig(micro_batch_size=layout.micro_batch, global_batch_size=global_batch),
        parallel=ParallelConfig(tp=layout.tp, pp=layout.pp, dp_replicate=layout.dp, microbatches=micro_batches,
                                activation_checkpointing=layout.recompute),
    )
    dims = ParallelDims(config.parallel, gpus)
    ranks = pick_ranks(dims)
    reports = dry_run(config, gpus, ranks, seq)
    planned = {r: rank_state_bytes(model_cfg, layout.tp, layout.pp, dims.coordinates(r)["pp"]) for r in ranks}
    text = (f"dry run of tp={layout.tp}, pp={layout.pp}, dp={layout.dp} (micro-batch {layout.micro_batch}, "
            f"{micro_batches} per step, {layout.recompute} recompute) as ranks {', '.join(map(str, ranks))} of {gpus}, "
            f"on PyTorch's fake process group:\n" + format_report(reports, planned))
    if not within(reports, planned):
        raise MtnlgError(text + "\nthe dry run's state is more than 1% from the planner's; the planner is wrong")
    return text + "\nevery checked rank's state is within 1% of the planner's"
