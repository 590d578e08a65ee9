"""Training-step throughput: mtnlg's Trainer against Hugging Face GPT2LMHeadModel, same shape, one run.

Both models get random init, the same batches, AdamW and gradient clipping; steps alternate between
the two so that machine noise hits both alike. MFU divides our achieved FLOP/s by a matmul peak
measured in the same run with the same thread count.

    .venv/bin/python benchmarks/train_throughput.py            # 6 layers, 384 hidden, seq 256, batch 8
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --compile --layers 12 --hidden 768 \
        --heads 12 --seq 1024 --batch 16 --steps 50               # the gpt2 preset on a GPU (gpu_check.sh)

On a GPU, MFU is against the data sheet's dense bf16 peak (`mtnlg.model.flops.GPU_PEAK_FLOPS`), and the
peer runs eagerly under the same autocast; --compile compiles ours only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mtnlg.config import load_config
from mtnlg.data.indexed import IndexedDatasetWriter
from mtnlg.hardware import this_cpu
from mtnlg.model.flops import measure_matmul_flops, model_size, peak_flops
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.optim import build_optimizer
from mtnlg.train.trainer import Trainer


def write_random_shards(prefix: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        with IndexedDatasetWriter(f"{prefix}_{split}", vocab) as writer:
            writer.add_document(rng.integers(0, vocab, tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warmup steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, on both sides")
    parser.add_argument("--compile", action="store_true", help="train.compile for ours")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else this_cpu().describe())
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_shards(tmp / "random", args.vocab, (args.steps + 4) * args.batch * args.seq + 1)
        Tokenizer.train(["benchmark text"], 300).save(tmp)
        overrides = [
            f"--model.vocab_size={args.vocab}", f"--model.n_layer={args.layers}", f"--model.d_model={args.hidden}",
            f"--model.n_head={args.heads}", f"--model.max_seq_len={args.seq}", f"--train.data={tmp / 'random'}",
            f"--train.out_dir={tmp / 'run'}", f"--train.micro_batch_size={args.batch}",
            f"--train.global_batch_size={args.batch}", f"--train.device={args.device}", f"--train.dtype={args.dtype}",
            f"--train.compile={str(args.compile).lower()}",
        ]
        ours = Trainer(load_config(None, ["--model.preset=gpt2", *overrides]))

        hf = GPT2LMHeadModel(
            GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                       n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        ).to(device)
        hf_optimizer = build_optimizer(hf, ours.config.train, fused=device.type == "cuda")
        hf_batches = iter([ours.loader.next_batch(args.batch) for _ in range(args.steps + 2)])
        ours.loader.consumed_samples = 0

        def hf_step() -> None:
            inputs = next(hf_batches)[0].to(device)
            with ours.precision.autocast():
                loss = hf(input_ids=inputs, labels=inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hf_optimizer.step()
            hf_optimizer.zero_grad(set_to_none=True)
            loss.item()  # wait for the device, as our train_step does

        times: dict[str, list[float]] = {"mtnlg": [], "hf": []}
        for step in range(args.steps + 2):
            for name, run in (("mtnlg", ours.train_step), ("hf", hf_step)):
                start = time.perf_counter()
                run()
                if step >= 2:
                    times[name].append(time.perf_counter() - start)

    if device.type == "cuda":
        peak = peak_flops(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    else:
        peak = max(measure_matmul_flops(device, n=n) for n in (1024, 2048))
    flops_per_token = model_size(ours.config.model, args.seq).flops_per_token
    tokens = args.batch * args.seq
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"shape: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, vocab {args.vocab}, "
          f"batch {args.batch}, {args.dtype}{', ours compiled' if args.compile else ''}, {args.threads} threads, "
          f"torch {torch.__version__}")
    source = "data sheet" if device.type == "cuda" else "measured"
    print(f"matmul peak ({source}): {peak / 1e9:.1f} GFLOP/s; model: {flops_per_token / 1e6:.1f} MFLOP/token (fwd+bwd)")
    for name in ("mtnlg", "hf"):
        mfu = rate[name] * flops_per_token / peak
        print(f"{name:<6} {rate[name]:8.1f} tokens/s  (median of {len(times[name])} steps)  MFU {mfu:.1%}")
    print(f"ratio mtnlg / hf: {rate['mtnlg'] / rate['hf']:.3f}")


if __name__ == "__main__":
    main()
