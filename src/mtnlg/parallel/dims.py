"""ParallelDims: check a parallel layout against the world size and the model, then build its DeviceMesh.

Every check runs before any process group or model exists, so a bad layout fails in a second with a
message naming the numbers to change. Ranks are laid out as (dp_replicate, dp_shard, pp, tp) with tp
innermost, so tensor-parallel partners are neighbours (on GPUs: the same node, on NVLink).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import ModelConfig, ParallelConfig
from mtnlg.errors import MtnlgError

MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "tp")


@dataclass
class ParallelDims:
    cfg: ParallelConfig
    world_size: int

    def __post_init__(self) -> None:
        self.cfg.validate()
        c = self.cfg
        if c.world_size != self.world_size:
            raise MtnlgError(
                f"parallel layout tp {c.tp} x pp {c.pp} x dp_shard {c.dp_shard} x dp_replicate {c.dp_replicate} "
                f"= {c.world_size}, but {self.world_size} {'processes are' if self.world_size != 1 else 'process is'} "
                "running; "
                f"change the [parallel] sizes so their product is {self.world_size}, or launch "
                f"torchrun --nproc-per-node {c.world_size}"
            )
        if c.dp_replicate > 1 and c.tp > 1 and c.dp_shard == 1:
            raise MtnlgError(
                f"parallel.dp_replicate ({c.dp_replicate}) with parallel.tp ({c.tp}) needs parallel.dp_shard > 1 "
                f"(hybrid sharding); DDP does not compose with tensor parallelism. Use parallel.dp_shard = "
                f"{c.dp_replicate} and dp_replicate = 1 instead"
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

    # -- checks against the model ----------------------------------------------------------------
    def validate_model(self, model_cfg: ModelConfig, seq_len: int | None = None) -> None:
        """Raise MtnlgError when `model_cfg` cannot be split this way."""
        tp, pp = self.cfg.tp, self.cfg.pp
        for name in ("n_head", "n_kv_head", "vocab_size", "d_ff"):
            value = getattr(model_cfg, name)
            if value % tp:
                choices = [d for d in range(1, value + 1) if value % d == 0 and d <= 64][:10]
                raise MtnlgError(
                    f"model.{name} ({value}) is not divisible by parallel.tp ({tp}): tensor parallelism splits it "
                    f"evenly over the tp ranks; use parallel.tp among {choices}"
                    + ("" if name != "vocab_size" else f", or pad model.vocab_size to {_round_up(value, tp * 64)}")
                )
        if pp > 1:  # every stage needs a block: the split itself says when there are too few
            from mtnlg.parallel.pipeline import stage_layers

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

    # -- the mesh --------------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu"):
        """One DeviceMesh over all ranks with a named dim for every size > 1 (a size-1 "dp_shard" dim when
        everything is 1), so `mesh["tp"]`, `mesh["dp_shard"]`, ... exist exactly when they are used."""
        from torch.distributed.device_mesh import init_device_mesh

        names = [name for name in MESH_DIMS if getattr(self.cfg, name) > 1] or ["dp_shard"]
        shape = [getattr(self.cfg, name) for name in names]
        return init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
