"""The parallel layout as arithmetic: degrees, their checks, the pipeline split and the batch rules.

One rule for the runtime and the planner: `mtnlg train` checks its layout here before any process group
or model exists, so a bad layout fails in a second with a message naming the numbers to change, and
`mtnlg plan` offers exactly the layouts that pass the same checks. No torch here, so planning a
thousand-GPU run needs none. Ranks are laid out as (dp_replicate, dp_shard, pp, tp) with tp innermost,
so tensor-parallel partners are neighbours (on GPUs: the same node, on NVLink).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import Config, ModelConfig, ParallelConfig
from mtnlg.errors import MtnlgError

MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "tp")
STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2}


def stage_layers(n_layer: int, pp: int, schedule: str) -> list[range]:
    """The blocks of each of the `pp * v` stages: contiguous, balanced, earlier stages one more if uneven.

    Earlier stages take the extra block because the last stage also runs the final norm, the head and the
    loss. Stage s runs on pipeline rank s % pp (round-robin, the interleaved layout).
    """
    n_stages = pp * STAGES_PER_RANK[schedule]
    if n_layer < n_stages:
        raise MtnlgError(
            f"model.n_layer ({n_layer}) is fewer than the {n_stages} pipeline stages of parallel.pp {pp} with "
            f"{schedule}; every stage needs at least one block, so use at least {n_stages} layers or a smaller "
            "parallel.pp" + (" or another parallel.pp_schedule" if n_stages > pp else "")
        )
    size, extra = divmod(n_layer, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def check_tp(model_cfg: ModelConfig, tp: int) -> None:
    """Tensor parallelism splits heads, kv heads, the vocabulary and the MLP's hidden units evenly over tp."""
    for name in ("n_head", "n_kv_head", "vocab_size", "d_ff"):
        value = getattr(model_cfg, name)
        if value % tp:
            choices = [d for d in range(1, value + 1) if value % d == 0 and d <= 64][:10]
            raise MtnlgError(
                f"model.{name} ({value}) is not divisible by parallel.tp ({tp}): tensor parallelism splits it "
                f"evenly over the tp ranks; use parallel.tp among {choices}"
                + ("" if name != "vocab_size" else f", or pad model.vocab_size to {_round_up(value, tp * 64)}")
            )


def check_microbatches(microbatches: int, pp: int, schedule: str) -> None:
    """What torch's schedules accept: 1F1B needs a micro-batch per stage to fill the pipeline, and interleaved
    1F1B runs them in equal rounds of about pp."""
    if pp == 1:
        return
    if microbatches < pp and schedule != "gpipe":
        raise MtnlgError(f"parallel.microbatches ({microbatches}) is fewer than the {pp} pipeline stages, which "
                         f"{schedule} needs to fill the pipeline; use at least {pp}, or parallel.pp_schedule gpipe")
    rounds = max(1, microbatches // pp)
    if schedule == "interleaved-1f1b" and microbatches % rounds:
        raise MtnlgError(f"parallel.microbatches ({microbatches}) does not split into {rounds} equal rounds of "
                         f"interleaved-1f1b over parallel.pp {pp}; use a multiple of {rounds} or of {pp}")


def check_pipeline_batch(config: Config, dp_size: int) -> None:
    """A pipeline step runs each data-parallel rank's whole slice as parallel.microbatches micro-batches of
    train.micro_batch_size: the three numbers must agree, and stay fixed (no batch-size ramp-up). Stages
    run eagerly."""
    tc, pc = config.train, config.parallel
    if tc.compile:
        raise MtnlgError("train.compile does not apply to pipeline stages; set train.compile = false or parallel.pp = 1")
    if tc.rampup_start:
        raise MtnlgError("batch-size ramp-up does not work with pipeline parallelism (the schedule's micro-batches "
                         "are fixed); set train.rampup_start = 0 or parallel.pp = 1")
    per_rank = tc.global_batch_size // dp_size
    if per_rank != tc.micro_batch_size * pc.microbatches:
        raise MtnlgError(
            f"with parallel.pp > 1 each data-parallel rank's {per_rank} samples (train.global_batch_size "
            f"{tc.global_batch_size} / {dp_size}) run as parallel.microbatches ({pc.microbatches}) micro-batches "
            f"of train.micro_batch_size ({tc.micro_batch_size}), so they must equal their product; e.g. set "
            f"train.global_batch_size = {tc.micro_batch_size * pc.microbatches * dp_size}"
        )


@dataclass
class ParallelDims:
    """A [parallel] layout checked against the number of running processes; its sizes and rank arithmetic."""

    cfg: ParallelConfig
    world_size: int

    def __post_init__(self) -> None:
        self.cfg.validate()
        c = self.cfg
        check_microbatches(c.microbatches, c.pp, c.pp_schedule)
        if c.world_size != self.world_size:
            raise MtnlgError(
                f"parallel layout tp {c.tp} x pp {c.pp} x dp_shard {c.dp_shard} x dp_replicate {c.dp_replicate} "
                f"= {c.world_size}, but {self.world_size} {'processes are' if self.world_size != 1 else 'process is'} "
                "running; "
                f"change the [parallel] sizes so their product is {self.world_size}, or launch "
                f"torchrun --nproc-per-node {c.world_size}"
            )

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.cfg.tp

    @property
    def pp(self) -> int:
        return self.cfg.pp

    @property
    def dp_shard(self) -> int:
        return self.cfg.dp_shard

    @property
    def dp_replicate(self) -> int:
        return self.cfg.dp_replicate

    @property
    def dp_size(self) -> int:
        """How many slices the global batch is cut into: every data-parallel rank takes one."""
        return self.cfg.dp_replicate * self.cfg.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.cfg.tp > 1

    @property
    def sequence_parallel(self) -> bool:
        return self.cfg.tp > 1 and self.cfg.sequence_parallel

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self.cfg, name) for name in MESH_DIMS}

    # -- checks against the model and the batch --------------------------------------------------
    def validate_model(self, model_cfg: ModelConfig, seq_len: int | None = None) -> None:
        """Raise MtnlgError when `model_cfg` cannot be split this way."""
        tp, pp = self.cfg.tp, self.cfg.pp
        check_tp(model_cfg, tp)
        if pp > 1:  # every stage needs a block: the split itself says when there are too few
            stage_layers(model_cfg.n_layer, pp, self.cfg.pp_schedule)
        if seq_len is not None and self.sequence_parallel and seq_len % tp:
            raise MtnlgError(
                f"sequence length {seq_len} is not divisible by parallel.tp ({tp}) with parallel.sequence_parallel; "
                f"use a multiple of {tp} or set parallel.sequence_parallel = false"
            )

    def validate_batch(self, global_batch_size: int, micro_batch_size: int | None = None) -> None:
        """The global batch must cut into equal slices, one per data-parallel rank."""
        if global_batch_size % self.dp_size:
            raise MtnlgError(
                f"train.global_batch_size ({global_batch_size}) is not divisible by the {self.dp_size} data-parallel "
                f"ranks (dp_shard {self.dp_shard} x dp_replicate {self.dp_replicate}); use a multiple of {self.dp_size}"
            )
        if micro_batch_size is not None and (global_batch_size // self.dp_size) % micro_batch_size:
            raise MtnlgError(
                f"each data-parallel rank gets {global_batch_size // self.dp_size} samples of the global batch "
                f"({global_batch_size} / {self.dp_size}), not a multiple of train.micro_batch_size ({micro_batch_size})"
            )

    # -- rank arithmetic (no process group needed) -----------------------------------------------
    def coordinates(self, rank: int) -> dict[str, int]:
        """Rank -> its index along each mesh dim, tp innermost."""
        out = {}
        for name in reversed(MESH_DIMS):
            size = getattr(self.cfg, name)
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in MESH_DIMS}

    def dp_rank(self, rank: int) -> int:
        """Which slice of the global batch `rank` trains on: ranks in one tp/pp group share a slice."""
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.cfg.dp_shard + c["dp_shard"]

    def batch_slice(self, global_batch_size: int, rank: int) -> slice:
        self.validate_batch(global_batch_size)
        per_rank = global_batch_size // self.dp_size
        start = self.dp_rank(rank) * per_rank
        return slice(start, start + per_rank)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
