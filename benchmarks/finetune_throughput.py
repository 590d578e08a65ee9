"""Fine-tuning throughput: mtnlg's LoRA and full fine-tuning against Hugging Face transformers + peft, one run.

One random-weight Llama-style model is built by mtnlg, saved as a checkpoint and exported with `export_hf`,
so both sides start from the same weights; Llama because HF's Llama names its projections as mtnlg does
(q_proj, v_proj, ...), so a LoRA target means the same matrices on both sides (GPT-2's fused c_attn would
not). The contestants, each training on the same token batches (every target counted):

  mtnlg-lora-qv    mtnlg's engine (ModelParts: WholeModel + build_optimizer, single process as the Trainer
                   builds it), LoRA r 8, alpha 16 on q_proj, v_proj (the defaults of [lora])
  mtnlg-lora-all   the same on every attention and MLP projection
  mtnlg-full       full fine-tuning
  peft-lora-qv     transformers' LlamaForCausalLM + peft get_peft_model, same r, alpha, targets and
  peft-lora-all    adapter values (copied from mtnlg's, per name)
  hf-full          LlamaForCausalLM, every weight trained

A step is forward, loss, backward, gradient clipping at 1.0 and AdamW, at fine-tuning's learning rates
(mtnlg.finetune.config: 2e-4 LoRA, 2e-5 full) and weight decay 0. The peers get torch's AdamW over their
trainable parameters with the same hyper-parameters, as a peft user writes it, and the same loss (labels
shifted as ours, summed over the counted targets and divided by their number). Every contestant's
first loss is checked to agree before any time is reported (and the second, after one update, printed).
Rounds alternate over the contestants, each beside its peer and the order reversed every other round, so
machine noise hits all alike; tokens/s is the median over rounds, and each ratio is given both as the ratio
of the medians and as the median of the per-round ratios (the steps of one round share the machine's mood).
Steps run at torch.set_num_threads(this machine's cores), so another program on the machine slows every
parallel op; the script says how many cores other programs kept busy during the timing. Peak memory is
each contestant's peak RSS in a fresh subprocess that first imports everything both sides use (the same
baseline), then loads its model and trains 3 steps; "added" is that peak minus the RSS after imports.

Then packing against padding for SFT: examples of log-uniform lengths between 16 and the sequence length
(a prompt share of 25-75% untrained), the same set trained once through mtnlg's LoRA (q, v) with packed
rows (`Examples(..., packing=True)`: several examples a row, attention kept within each) and with padded
rows (one example a row, padded to the longest of its batch), the same rows per batch; the rate counts the
examples' own tokens.

    .venv/bin/python benchmarks/finetune_throughput.py                  # 6 layers, d_model 512, seq 256, batch 4
    .venv/bin/python benchmarks/finetune_throughput.py --preset tiny    # a quick check that it all runs
    .venv/bin/python benchmarks/finetune_throughput.py --batch 8 --rounds 3 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from mtnlg.checkpoint import base_weights, save_checkpoint
from mtnlg.config import Config, LoraConfig, ModelConfig, TrainConfig
from mtnlg.data.batch import Batch, Row
from mtnlg.finetune.config import DEFAULTS, FULL_LR, LORA_LR
from mtnlg.finetune.data import Examples
from mtnlg.finetune.lora import adapter_initial_value, apply_lora, is_adapter, with_new_adapters
from mtnlg.hardware import Precision, keep_freed_memory, this_cpu
from mtnlg.interop.hf import export_hf
from mtnlg.model.flops import measure_matmul_flops
from mtnlg.model.gpt import GPT
from mtnlg.parallel.launch import init_distributed
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.parts import ModelParts

MiB = 2**20
PRESETS = {
    "small": dict(layers=6, d_model=512, heads=8, vocab=8192, seq=256, batch=4),
    "tiny": dict(layers=2, d_model=128, heads=4, vocab=1024, seq=64, batch=4),
}
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (side, LoRA targets or None for full fine-tuning)
CONTESTANTS = {  # in each round's order (reversed every other round), each beside its peer
    "mtnlg-lora-qv": ("mtnlg", QV),
    "peft-lora-qv": ("hf", QV),
    "mtnlg-lora-all": ("mtnlg", ALL),
    "peft-lora-all": ("hf", ALL),
    "mtnlg-full": ("mtnlg", None),
    "hf-full": ("hf", None),
}
R, ALPHA, SEED = 8, 16.0, 1234


@dataclass
class Contestant:
    name: str
    step: Callable[[Batch], float]  # one optimizer step; returns the loss
    optimizer: torch.optim.Optimizer
    trainable: int

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq, step)."""
        return sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_name("llama-tiny", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                                 n_kv_head=args.heads, d_model=args.d_model, max_seq_len=args.seq)


def train_config(args: argparse.Namespace, lora: bool) -> TrainConfig:
    """Fine-tuning's defaults (`mtnlg finetune`), one micro-batch of the whole batch, fp32 on the CPU."""
    return TrainConfig(**{**DEFAULTS["train"], "lr": LORA_LR if lora else FULL_LR, "micro_batch_size": args.batch,
                          "global_batch_size": args.batch, "device": "cpu", "seed": SEED, "progress": False})


def build_mtnlg(checkpoint: Path, args: argparse.Namespace, targets: list[str] | None, name: str) -> Contestant:
    """mtnlg's engine as the Trainer builds it for one process: the layout from the default ParallelConfig,
    the base checkpoint's weights (with new adapters), ModelParts' WholeModel and optimizer."""
    lora = LoraConfig(r=R, alpha=ALPHA, targets=list(targets)) if targets else LoraConfig()
    tc = train_config(args, bool(targets))
    config = Config(model=model_config(args), train=tc, lora=lora)
    dist = init_distributed(config.parallel, torch.device("cpu"))
    first = base_weights(checkpoint)
    torch.manual_seed(tc.seed)
    parts = ModelParts(config, dist, Precision.for_training(tc.dtype, dist.device),
                       with_new_adapters(first, tc.seed) if lora.r else first)

    def step(batch: Batch) -> float:
        loss, _ = parts.train_step(batch, max(batch.loss_tokens, 1) / dist.dims.dp_size, tc.lr, tc.grad_clip)
        return float(loss)

    trainable = sum(p.numel() for m in parts.modules for p in m.parameters() if p.requires_grad)
    return Contestant(name, step, parts.optimizers[0], trainable)


def hf_module_name(ours: str) -> str:
    """mtnlg's module name -> HF Llama's: blocks.3.attn.q_proj -> model.layers.3.self_attn.q_proj."""
    return ours.replace("blocks.", "model.layers.", 1).replace(".attn.", ".self_attn.")


def build_hf(hf_dir: Path, args: argparse.Namespace, targets: list[str] | None, name: str) -> Contestant:
    """transformers' LlamaForCausalLM from the export, with peft's LoRA on the same layers (and mtnlg's
    adapter values, so both train the same numbers), or whole; AdamW over its trainable parameters, as a
    peft user writes it, with the run's hyper-parameters."""
    from transformers import AutoModelForCausalLM

    tc = train_config(args, bool(targets))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if targets:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                           target_modules=list(targets), task_type="CAUSAL_LM"))
        with torch.no_grad():
            params = dict(model.named_parameters())
            for ours, value in mtnlg_adapters(model_config(args), targets, tc.seed).items():
                module, adapter = ours.rsplit(".", 1)
                params[f"base_model.model.{hf_module_name(module)}.{adapter}.default.weight"].copy_(value)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                  weight_decay=tc.weight_decay)

    def step(batch: Batch) -> float:
        denominator = max(batch.loss_tokens, 1)
        # shift_labels: the targets exactly as ours (HF would otherwise shift `labels` itself, one fewer per
        # row); num_items_in_batch: summed over the counted targets and divided by their number, as ours.
        loss = model(input_ids=batch.inputs, labels=batch.inputs, shift_labels=batch.targets,
                     num_items_in_batch=denominator, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return Contestant(name, step, optimizer, sum(p.numel() for p in trainable))


def mtnlg_adapters(cfg: ModelConfig, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The first values mtnlg gives its adapters (per seed and name), by name."""
    with torch.device("meta"):
        model = GPT(cfg)
    apply_lora(model, LoraConfig(r=R, alpha=ALPHA, targets=list(targets)))
    return {n: adapter_initial_value(model, n, seed) for n, _ in model.named_parameters() if is_adapter(n)}


def build(name: str, checkpoint: Path, hf_dir: Path, args: argparse.Namespace) -> Contestant:
    side, targets = CONTESTANTS[name]
    return build_mtnlg(checkpoint, args, targets, name) if side == "mtnlg" else build_hf(hf_dir, args, targets, name)


def token_batches(args: argparse.Namespace, count: int) -> list[Batch]:
    """Full rows of random tokens, every target counted."""
    rng = np.random.default_rng(0)
    return [Batch.collate(list(rng.integers(0, args.vocab, (args.batch, args.seq + 1)))) for _ in range(count)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has spent busy, of them this process's), from /proc/stat (Linux):
    the difference over a phase tells how much of the CPUs other programs took meanwhile."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    mine = resource.getrusage(resource.RUSAGE_SELF)
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), mine.ru_utime + mine.ru_stime


def others_share(before: tuple[float, float] | None, wall: float, cores: int) -> str:
    after = busy_seconds()
    if before is None or after is None:
        return ""
    others = max(0.0, (after[0] - before[0]) - (after[1] - before[1]))
    return f"; other programs kept {others / wall:.1f} of the {cores} cores busy meanwhile"


def child(args: argparse.Namespace) -> None:
    """One contestant's memory in a fresh process: everything both sides use imported first (the baseline),
    then its model loaded and 3 steps trained; prints a JSON line."""
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    warnings.filterwarnings("ignore")
    import peft  # noqa: F401
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    batches = token_batches(args, 3)
    baseline = _rss()
    work = Path(args.child_dir)
    contestant = build(args.child, work / "mtnlg", work / "hf", args)
    for batch in batches:
        contestant.step(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(baseline=baseline, peak=peak)))


def measure_memory(name: str, work: Path, args: argparse.Namespace) -> dict[str, int]:
    argv = [sys.executable, __file__, "--child", name, "--child-dir", str(work), f"--threads={args.threads}",
            *(f"--{key.replace('_', '-')}={getattr(args, key)}" for key in PRESETS["small"])]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"memory of {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- packing against padding -----


def sft_rows(n: int, vocab: int, seq: int, seed: int = 0) -> list[Row]:
    """n examples of log-uniform lengths in [16, seq] tokens (the end-of-document token included), each a
    prompt of 25-75% of it (not trained) and a response."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(16), np.log(seq), n)).round().astype(int)
    rows = []
    for length in lengths:
        prompt = int(rng.integers(length // 4, 3 * length // 4 + 1))
        rows.append(Row(rng.integers(0, vocab, length), np.arange(length) >= prompt))
    return rows


def one_epoch(examples: Examples, n_examples: int) -> list[Row]:
    """The rows of the first epoch: until every example has been seen once (a packed row holds several, each
    starting at position 0)."""
    rows, seen = [], 0
    while seen < n_examples:
        row = examples.sample(len(rows))
        seen += 1 if row.positions is None else int((row.positions == 0).sum())
        rows.append(row)
    return rows


def packing_vs_padding(contestant: Contestant, args: argparse.Namespace) -> None:
    rows = sft_rows(args.sft_examples, args.vocab, args.seq)
    real = sum(len(r.tokens) for r in rows)
    modes, padding = {}, {}
    for mode, packing in (("packed", True), ("padded", False)):
        examples = Examples(rows, args.seq, SEED, packing)
        assert len(examples.examples) == len(rows)  # none cut or dropped: each has a response within the row
        epoch = one_epoch(examples, len(rows))
        batches = [Batch.collate(epoch[i : i + args.batch]) for i in range(0, len(epoch), args.batch)]
        modes[mode] = batches
        inputs = sum(len(r.tokens) - 1 for r in epoch)  # a row's last token is only a target
        padding[mode] = 1 - inputs / sum(b.inputs.numel() for b in batches)
        contestant.step(batches[0])  # warm-up on this mode's shapes
    times: dict[str, list[float]] = {m: [] for m in modes}
    before, began = busy_seconds(), time.perf_counter()
    for _ in range(args.sft_rounds):
        for mode, batches in modes.items():
            start = time.perf_counter()
            for batch in batches:
                contestant.step(batch)
            times[mode].append(time.perf_counter() - start)
    lengths = np.array([len(r.tokens) for r in rows])
    print(f"\npacking vs padding ({contestant.name}): {len(rows)} examples of log-uniform lengths 16-{args.seq} "
          f"(median {int(np.median(lengths))}, mean {lengths.mean():.0f}; {real} tokens), {args.batch} rows a batch, "
          f"one pass over them per round, {args.sft_rounds} rounds"
          f"{others_share(before, time.perf_counter() - began, os.cpu_count() or 1)}")
    print("| rows | count | batches | rows x width | padding | time per pass (median; each round) | example tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rate = {}
    for mode, batches in modes.items():
        t = statistics.median(times[mode])
        rate[mode] = real / t
        print(f"| {mode} | {sum(b.inputs.size(0) for b in batches)} | {len(batches)} | "
              f"{sum(b.inputs.numel() for b in batches)} | {padding[mode]:.0%} | {t:.2f} s "
              f"({', '.join(f'{x:.2f}' for x in times[mode])}) | {rate[mode]:.0f} |")
    print(f"ratio packed / padded: {rate['packed'] / rate['padded']:.2f}")


# ----- main -----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    for key in PRESETS["small"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: the cores")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per contestant per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating over the contestants")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contestant first")
    parser.add_argument("--only", default="", help="comma-separated contestants (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--sft-examples", type=int, default=128, help="0 skips packing vs padding")
    parser.add_argument("--sft-rounds", type=int, default=2)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        child(args)
        return

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # what the Trainer does on CPU; in this process for both sides alike
    warnings.filterwarnings("ignore")
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(this_cpu().describe())
    names = [n for n in CONTESTANTS if not args.only or n in args.only.split(",")]
    cfg = model_config(args)
    tokens = args.batch * args.seq
    print(f"shape: Llama-style, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_ff {cfg.d_ff}, "
          f"vocab {args.vocab}, seq {args.seq}, batch {args.batch} ({tokens} tokens a step), fp32, {args.threads} "
          f"threads; LoRA r {R}, alpha {ALPHA:g}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    peak = max(measure_matmul_flops(torch.device("cpu"), n=n) for n in (1024, 2048))
    print(f"matmul peak (measured now, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = GPT(cfg, seed=SEED)
        checkpoint = save_checkpoint(work / "mtnlg", model, Config(model=cfg), Tokenizer.train(["benchmark text"], 300))
        hf_dir = export_hf(checkpoint, work / "hf")
        del model

        memory = {}
        if not args.no_memory:
            for name in names:
                memory[name] = measure_memory(name, work, args)
                print(f"memory of {name}: peak {memory[name]['peak'] / MiB:.0f} MiB", flush=True)

        contestants = [build(name, checkpoint, hf_dir, args) for name in names]
        batches = token_batches(args, max(4, args.steps))
        first = {c.name: c.step(batches[0]) for c in contestants}  # the same weights and batch: the same loss
        print("first loss: " + ", ".join(f"{n} {v:.6f}" for n, v in first.items()), flush=True)
        spread = max(first.values()) - min(first.values())
        if spread > 1e-4:
            raise SystemExit(f"the contestants disagree on the first loss (spread {spread:.2e}); not timing them")
        state = {c.name: c.state_bytes() for c in contestants}
        second = {c.name: [c.step(batches[i % len(batches)]) for i in range(1, args.warmup)] for c in contestants}
        if args.warmup > 1:  # after one AdamW step from the same weights (and adapters): still the same loss
            print("second loss: " + ", ".join(f"{n} {v[0]:.6f}" for n, v in second.items()), flush=True)
        rates: dict[str, list[float]] = {c.name: [] for c in contestants}
        before, began = busy_seconds(), time.perf_counter()
        for r in range(args.rounds):
            for c in contestants if r % 2 == 0 else contestants[::-1]:
                start = time.perf_counter()
                for i in range(args.steps):
                    c.step(batches[(r * args.steps + i) % len(batches)])
                rates[c.name].append(args.steps * tokens / (time.perf_counter() - start))

        rate = {n: statistics.median(v) for n, v in rates.items()}
        shared = others_share(before, time.perf_counter() - began, os.cpu_count() or 1)
        print(f"\n{args.rounds} rounds of {args.steps} steps per contestant after {args.warmup} warm-up steps; "
              f"tokens/s is the median over rounds (the range in brackets){shared}")
        print("| contestant | tokens/s | trainable params | optimizer state | peak RSS | added by training |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in contestants:
            m = memory.get(c.name)
            mem = f"{m['peak'] / MiB:.0f} MiB | {(m['peak'] - m['baseline']) / MiB:.0f} MiB" if m else "- | -"
            print(f"| {c.name} | {rate[c.name]:.0f} ({min(rates[c.name]):.0f}-{max(rates[c.name]):.0f}) | "
                  f"{c.trainable:,} | {state[c.name] / MiB:.2f} MiB | {mem} |")
        for ours, theirs in (("mtnlg-lora-qv", "peft-lora-qv"), ("mtnlg-lora-all", "peft-lora-all"),
                             ("mtnlg-full", "hf-full"), ("mtnlg-lora-qv", "mtnlg-full")):
            if ours in rate and theirs in rate:
                paired = [a / b for a, b in zip(rates[ours], rates[theirs])]  # the same round: the same noise
                print(f"speed {ours} / {theirs}: {rate[ours] / rate[theirs]:.2f} (medians); per round "
                      f"{statistics.median(paired):.2f} median, {min(paired):.2f}-{max(paired):.2f}")
        for lora in ("mtnlg-lora-qv", "mtnlg-lora-all"):
            if lora in state and "mtnlg-full" in state:
                print(f"optimizer state {lora} / mtnlg-full: {state[lora] / state['mtnlg-full']:.2%}")

        if args.sft_examples:
            sft = next((c for c in contestants if c.name == "mtnlg-lora-qv"), None)
            packing_vs_padding(sft or build("mtnlg-lora-qv", checkpoint, hf_dir, args), args)


if __name__ == "__main__":
    main()
