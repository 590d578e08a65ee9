"""Analytic cluster planner: which tensor x pipeline x data layout fits a model on N GPUs, and how fast it runs.

Before booking thousands of GPUs one wants to know, on paper, which 3D layouts fit in GPU memory and
roughly how long a run takes. Everything here is arithmetic (no torch, no devices), so it answers
in milliseconds for a 530B model and every number can be checked by hand:

- training state per GPU: bf16 weights (2 B/param), fp32 main gradients (4 B), fp32 master weights +
  Adam moments (12 B), for the parameters of the fullest GPU, counted exactly as the runtime places
  them (`rank_params`); no ZeRO unless asked (`zero1` then splits the 12 B optimizer state over the
  data-parallel replicas);
- activations per layer from Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", with sequence parallelism whenever tp > 1, times the layers of a stage times
  the micro-batches in flight on the first stage under 1F1B;
- step time from FLOPs at an assumed fraction of the GPU's peak, stretched by the pipeline bubble and by
  the fullest stage when the blocks do not split evenly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mtnlg.config import ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.model.flops import TRAINING_BYTES_PER_PARAM, model_size, norm_params
from mtnlg.parallel.layout import check_microbatches, check_tp, stage_layers

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s, from the data sheet
    memory_bytes: int


GPUS = {
    "a100-80g": Gpu("A100 80GB SXM", 312e12, 80 * GiB),
    "h100": Gpu("H100 SXM", 989e12, 80 * GiB),
    "h200": Gpu("H200 SXM", 989e12, 141 * 10**9),
}

# Named assumptions, printed with every plan so that nobody mistakes the output for a measurement.
MATMUL_EFFICIENCY = 0.55  # fraction of peak a well-tuned transformer step reaches, before bubble and tp traffic
TP_COMM_PENALTY = 0.05  # tensor-parallel all-reduces cost 5% of compute per doubling of tp (tp=8: / 1.15)
MEMORY_HEADROOM = 0.90  # a layout fits when it needs at most 90% of GPU memory (allocator, buffers, NCCL)
TP_SIZES = (1, 2, 4, 8)  # powers of two within an 8-GPU node: tensor-parallel traffic stays on NVLink
MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")

WEIGHT_BYTES = TRAINING_BYTES_PER_PARAM["bf16 weights"]
GRAD_BYTES = TRAINING_BYTES_PER_PARAM["fp32 gradients"]
OPTIMIZER_BYTES = TRAINING_BYTES_PER_PARAM["fp32 master weights"] + TRAINING_BYTES_PER_PARAM["fp32 Adam moments"]


@dataclass(frozen=True)
class Layout:
    """One way to place the model on the cluster, with its memory per GPU and its speed."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    recompute: str
    layers_per_stage: int
    params_per_gpu: int  # parameters of the fullest pipeline rank, cut over tp (`rank_params`)
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    bubble: float  # (pp - 1) / micro-batches per pipeline: idle share added to the ideal step time
    step_seconds: float
    tflops_per_gpu: float  # hardware FLOP/s achieved, recompute included (as Megatron and MT-NLG report it)
    mfu: float  # model FLOPs (no recompute) / time / peak
    tokens_per_second: float
    days: float  # to train the requested number of tokens

    @property
    def state_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def rank_params(cfg: ModelConfig, tp: int, pp: int, pp_rank: int, schedule: str = "1f1b") -> int:
    """Parameters one GPU holds, placed as the runtime places them: the blocks of the stages that pipeline
    rank `pp_rank` runs (stage s on rank s % pp), the embeddings with the first stage, the final norm and
    the head with the last, each cut over tp as mtnlg.parallel.parallelize cuts it (vocabulary-parallel
    embedding and head, learned positions whole).

    Tied embeddings are one tensor when one stage holds both ends (pp == 1); with pp > 1 the last stage
    holds the head as a copy of the token embedding, as in Megatron.
    """
    if not 0 <= pp_rank < pp:
        raise MtnlgError(f"pipeline rank {pp_rank} is outside pp {pp}; pass a rank from 0 to {pp - 1}")
    check_tp(cfg, tp)
    stages = stage_layers(cfg.n_layer, pp, schedule) if pp > 1 else [range(cfg.n_layer)]  # pp 1: no pipeline
    mine = range(pp_rank, len(stages), pp)
    params = sum(len(stages[s]) for s in mine) * _block_rank_params(cfg, tp)
    token = cfg.vocab_size * cfg.d_model // tp
    first, last = 0 in mine, len(stages) - 1 in mine
    if first:
        params += token + (cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0)
    if last:
        params += norm_params(cfg) + (0 if cfg.tie_embeddings and first else token)
    return params


def _block_rank_params(cfg: ModelConfig, tp: int) -> int:
    """One block on one tp rank: q/k/v/up/gate (column-parallel: weight and bias) and the o/down weights
    (row-parallel) are cut over tp; the o/down biases, added after the reduction, and the norms stay whole."""
    d, q, kv, bias = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, int(cfg.bias)
    n_up = 2 if cfg.mlp == "swiglu" else 1
    column = (q + 2 * kv) * (d + int(cfg.bias or cfg.qkv_bias)) + n_up * cfg.d_ff * (d + bias)
    row = (q + cfg.d_ff) * d
    return (column + row) // tp + 2 * bias * d + 2 * norm_params(cfg) + 2 * cfg.head_dim * int(cfg.qk_norm)


def rank_state_bytes(
    cfg: ModelConfig, tp: int, pp: int, pp_rank: int, schedule: str = "1f1b", dp_shard: int = 1
) -> dict[str, int]:
    """Training state on one GPU in bytes, by kind (`TRAINING_BYTES_PER_PARAM`), as the planner counts it;
    FSDP over `dp_shard` ranks divides all of it."""
    params = rank_params(cfg, tp, pp, pp_rank, schedule)
    return {what: params * nbytes // dp_shard for what, nbytes in TRAINING_BYTES_PER_PARAM.items()}


def activation_bytes_per_layer(cfg: ModelConfig, seq: int, micro_batch: int, tp: int, recompute: str) -> float:
    """Korthikanti et al. 2022, bf16 activations of one layer, sequence parallel when tp > 1.

    none: s*b*h*(34 + 5*a*s/h) / t; selective (recompute attention scores): s*b*h*34 / t;
    full (keep only each layer's input): 2*s*b*h / t.
    """
    sbh, a, h = seq * micro_batch * cfg.d_model, cfg.n_head, cfg.d_model
    if recompute == "none":
        return sbh * (34 + 5 * a * seq / h) / tp
    if recompute == "selective":
        return sbh * 34 / tp
    return 2 * sbh / tp


def tp_efficiency(tp: int) -> float:
    return 1 / (1 + TP_COMM_PENALTY * math.log2(tp))


def plan(
    cfg: ModelConfig,
    gpus: int,
    gpu: str,
    global_batch: int,
    seq: int,
    *,
    tokens: float = 300e9,
    micro_batch: int | None = None,
    tp: int | None = None,
    pp: int | None = None,
    zero1: bool = False,
    efficiency: float = MATMUL_EFFICIENCY,
) -> list[Layout]:
    """Every layout that fits in memory (with headroom), fastest first; MtnlgError when none does."""
    if gpu not in GPUS:
        raise MtnlgError(f"unknown GPU {gpu!r}; choose one of: {', '.join(GPUS)}")
    for name, value in (("--gpus", gpus), ("--global-batch", global_batch), ("--seq", seq), ("--tokens", tokens)):
        if value <= 0:
            raise MtnlgError(f"{name} must be positive, got {value}")
    if micro_batch is not None and micro_batch <= 0:
        raise MtnlgError(f"--micro-batch must be positive, got {micro_batch}")
    if not 0 < efficiency <= 1:
        raise MtnlgError(f"--efficiency must be in (0, 1], got {efficiency}")
    if cfg.position == "learned" and seq > cfg.max_seq_len:
        raise MtnlgError(f"--seq {seq} is longer than the model's learned positions ({cfg.max_seq_len}); pass --seq <= {cfg.max_seq_len}")

    if tp:  # a size the runtime refuses fails with the runtime's message
        check_tp(cfg, tp)
    if pp:
        stage_layers(cfg.n_layer, pp, "1f1b")

    device = GPUS[gpu]
    size = model_size(cfg, seq)
    fullest = {(t, p): max(rank_params(cfg, t, p, r) for r in range(p)) for t, p in _grid(cfg, gpus, tp, pp)}
    candidates = [
        _layout(cfg, size.flops_per_token, device, gpus, global_batch, seq, t, p, params, b, r, tokens, zero1, efficiency)
        for (t, p), params in fullest.items()
        for b in ((micro_batch,) if micro_batch else MICRO_BATCHES)
        if _runs(global_batch, gpus // (t * p) * b, p)
        for r in RECOMPUTE
    ]
    if not candidates:
        raise MtnlgError(
            f"no layout of {gpus} GPUs divides global batch {global_batch} into data-parallel micro-batches"
            f"{' with the given --tp/--pp/--micro-batch' if tp or pp or micro_batch else ''}; "
            "make the global batch a multiple of data-parallel size x micro-batch, or change --gpus"
        )
    limit = MEMORY_HEADROOM * device.memory_bytes
    fits = sorted((c for c in candidates if c.total_bytes <= limit), key=lambda c: (c.step_seconds, c.total_bytes))
    if not fits:
        best = min(candidates, key=lambda c: c.total_bytes)
        raise MtnlgError(
            f"no layout fits in {MEMORY_HEADROOM:.0%} of a {device.name}'s {device.memory_bytes / GiB:.0f} GiB; "
            f"the smallest needs {best.total_bytes / GiB:.1f} GiB per GPU (tp={best.tp}, pp={best.pp}, "
            f"micro-batch {best.micro_batch}, {best.recompute} recompute); use more GPUs, a GPU with more memory, "
            "--zero1, or a shorter --seq"
        )
    return fits


def _runs(global_batch: int, samples_per_micro_batch: int, pp: int) -> bool:
    """Whether the batch cuts into whole micro-batches over the data-parallel ranks, enough of them for the
    pipeline (the runtime's rule, for 1F1B)."""
    if global_batch % samples_per_micro_batch:
        return False
    try:
        check_microbatches(global_batch // samples_per_micro_batch, pp, "1f1b")
    except MtnlgError:
        return False
    return True


def _grid(cfg: ModelConfig, gpus: int, tp: int | None, pp: int | None) -> list[tuple[int, int]]:
    """(tp, pp) pairs that divide the GPUs and that the runtime accepts (mtnlg.parallel.layout): tp a power
    of two within a node that splits the model evenly, pp any size whose 1F1B split gives every stage a block."""
    pairs = []
    for t in TP_SIZES:
        if gpus % t or tp not in (None, t) or not _accepts(check_tp, cfg, t):
            continue
        for p in range(1, gpus // t + 1):
            if gpus % (t * p) == 0 and pp in (None, p) and _accepts(stage_layers, cfg.n_layer, p, "1f1b"):
                pairs.append((t, p))
    return pairs


def _accepts(check: Callable[..., object], *args: object) -> bool:
    """Whether a runtime check passes (it raises MtnlgError naming the fix when it does not)."""
    try:
        check(*args)
    except MtnlgError:
        return False
    return True


def _layout(
    cfg: ModelConfig, flops_per_token: int, device: Gpu, gpus: int, global_batch: int, seq: int,
    tp: int, pp: int, params: int, micro_batch: int, recompute: str, tokens: float, zero1: bool, efficiency: float,
) -> Layout:
    dp = gpus // (tp * pp)
    layers = len(stage_layers(cfg.n_layer, pp, "1f1b")[0])  # the first stage: the most blocks and micro-batches
    micro_batches = global_batch // (dp * micro_batch)
    in_flight = min(pp, micro_batches)  # 1F1B: the first stage holds pp micro-batches' activations at most
    activations = activation_bytes_per_layer(cfg, seq, micro_batch, tp, recompute) * layers * in_flight
    bubble = (pp - 1) / micro_batches

    step_tokens = global_batch * seq
    model_flops = flops_per_token * step_tokens
    # Recompute repeats forward work: full one whole forward (a third of forward+backward), selective only
    # the attention scores and their product with V (4 * s * h FLOPs per token per layer).
    extra = {"none": 0.0, "selective": 4 * cfg.n_layer * seq * cfg.d_model * step_tokens, "full": model_flops / 3}
    hardware_flops = model_flops + extra[recompute]
    rate = gpus * device.peak_flops * efficiency * tp_efficiency(tp)
    # Every stage waits for the slowest: with blocks that do not divide evenly, the fullest stage sets the pace.
    imbalance = layers * pp / cfg.n_layer
    step = hardware_flops / rate * imbalance * (1 + bubble)
    return Layout(
        tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, recompute=recompute, layers_per_stage=layers,
        params_per_gpu=params, weight_bytes=params * WEIGHT_BYTES, grad_bytes=params * GRAD_BYTES,
        optimizer_bytes=params * OPTIMIZER_BYTES // (dp if zero1 else 1), activation_bytes=round(activations),
        bubble=bubble, step_seconds=step, tflops_per_gpu=hardware_flops / step / gpus / 1e12,
        mfu=model_flops / step / gpus / device.peak_flops, tokens_per_second=step_tokens / step,
        days=tokens / (step_tokens / step) / 86400,
    )


def assumptions(gpu: str, efficiency: float = MATMUL_EFFICIENCY, zero1: bool = False) -> list[str]:
    """The numbers every plan rests on, in words."""
    device = GPUS[gpu]
    return [
        f"GPU: {device.name}, {device.peak_flops / 1e12:.0f} TFLOP/s dense bf16 peak, {device.memory_bytes / GiB:.1f} GiB; "
        f"a layout fits at <= {MEMORY_HEADROOM:.0%} of memory",
        f"compute: {efficiency:.0%} of peak on matmuls; tp costs {TP_COMM_PENALTY:.0%} per doubling "
        f"(tp=8 runs at {tp_efficiency(8):.0%}); data-parallel all-reduce and pipeline sends assumed overlapped",
        "step time = FLOPs (6N + attention, plus recompute) / (GPUs x peak x efficiency) x imbalance x (1 + bubble); "
        "imbalance = blocks of the fullest stage / mean blocks per stage; bubble = (pp - 1) / micro-batches per "
        "pipeline (1F1B)",
        f"memory: bf16 weights {WEIGHT_BYTES} B + fp32 grads {GRAD_BYTES} B + fp32 master and Adam {OPTIMIZER_BYTES} B "
        f"per parameter on the fullest GPU (its stages, cut over tp as the runtime cuts them); {'ZeRO-1: optimizer / dp' if zero1 else 'no ZeRO (--zero1 splits the optimizer over dp)'}",
        "activations: Korthikanti et al. 2022 with sequence parallelism, x layers per stage x min(pp, micro-batches) "
        "in flight on the first stage; TFLOP/s counts recompute (as MT-NLG reports), MFU does not",
    ]


def format_plan(layouts: list[Layout], gpu: str, *, limit: int | None = 10, efficiency: float = MATMUL_EFFICIENCY,
                zero1: bool = False) -> str:
    """Assumptions, then a table of the layouts (the first `limit`; None for all)."""
    lines = ["assumptions:", *(f"  - {a}" for a in assumptions(gpu, efficiency, zero1)), ""]
    header = ("tp", "pp", "dp", "mb", "recompute", "state GiB", "act GiB", "total GiB", "bubble %", "step s",
              "TFLOP/s/GPU", "MFU", "days")
    rows = [
        (x.tp, x.pp, x.dp, x.micro_batch, x.recompute, f"{x.state_bytes / GiB:.1f}", f"{x.activation_bytes / GiB:.1f}",
         f"{x.total_bytes / GiB:.1f}", f"{100 * x.bubble:.1f}", f"{x.step_seconds:.{1 if x.step_seconds >= 10 else 3}f}", f"{x.tflops_per_gpu:.0f}",
         f"{100 * x.mfu:.1f}%", f"{x.days:.1f}")
        for x in layouts[:limit]
    ]
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        lines.append("  ".join(str(v).rjust(w) for v, w in zip(row, widths)).rstrip())
    shown = len(rows)
    lines.append(f"{shown} of {len(layouts)} feasible layouts, fastest first" + ("" if shown == len(layouts) else "; --all shows every one"))
    return "\n".join(lines)
