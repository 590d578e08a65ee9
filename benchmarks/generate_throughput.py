"""Decode throughput: mtnlg's generate against Hugging Face `generate` on the GPT-2 124M shape.

Random weights (throughput does not depend on their values), greedy, KV cache on both sides, a 32-token
prompt and 128 new tokens (end-of-text ignored, so every run is full length), batch 1 and batch 8,
alternating in one process. The floor is the time to read every weight once per decode step at the
memory bandwidth measured in the same run (the best of a streaming read taken before every round, so
a quiet moment on a shared machine makes the floor stricter, never looser): at batch 1 decoding can't
beat it.

    .venv/bin/python benchmarks/generate_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from mtnlg.config import ModelConfig
from mtnlg.inference.cpu import pack_for_cpu_inference
from mtnlg.inference.generate import Sampling, generate
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.tokenizer import Tokenizer


def measure_bandwidth(megabytes: int = 1024) -> float:
    """Bytes/s of reading a large fp32 tensor once (the access pattern of a decode step's weights)."""
    x = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", vocab_size=50257)
    ours = GPT(cfg).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters()) - cfg.max_seq_len * cfg.d_model * 4
    pack_for_cpu_inference(ours)  # what mtnlg.load does on CPU
    hf = GPT2LMHeadModel(GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12)).eval()
    tokenizer = Tokenizer.train(["benchmark"], 300)
    params = Sampling(temperature=0, max_new_tokens=args.new, ignore_eos=True)
    bandwidths = [measure_bandwidth()]

    print(f"GPT-2 124M shape, fp32, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens, greedy, "
          f"torch {torch.__version__}")
    results = []
    for batch in args.batches:
        prompts = torch.randint(0, 300, (batch, args.prompt))
        runs = {
            "mtnlg": lambda: generate(ours, tokenizer, prompts.tolist(), params),
            "hf": lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                      max_new_tokens=args.new, min_new_tokens=args.new, use_cache=True,
                                      pad_token_id=0),
        }
        prefill = {
            "mtnlg": lambda: ours(prompts, cache=KVCache(cfg, batch, args.prompt, "cpu", torch.float32)),
            "hf": lambda: hf(prompts, use_cache=True),
        }
        totals: dict[str, list[float]] = {"mtnlg": [], "hf": []}
        prefills: dict[str, list[float]] = {"mtnlg": [], "hf": []}
        with torch.no_grad():
            for name in runs:  # warm up
                runs[name]()
            for _ in range(args.rounds):
                bandwidths.append(measure_bandwidth())
                for name in runs:
                    prefills[name].append(timed(prefill[name]))
                    totals[name].append(timed(runs[name]))
        for name in runs:
            total, pre = statistics.median(totals[name]), statistics.median(prefills[name])
            results.append((batch, name, total - pre, pre))

    bandwidth = max(bandwidths)
    floor = weight_bytes / bandwidth
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (best of {len(bandwidths)} streaming reads, "
          f"{min(bandwidths) / 1e9:.1f} the worst); weights read per step {weight_bytes / 1e6:.0f} MB "
          f"-> floor {floor * 1e3:.1f} ms/step = {1 / floor:.1f} tokens/s at batch 1")
    rate = {}
    for batch, name, decode, pre in results:
        rate[batch, name] = batch * args.new / decode
        step_ms = decode / args.new * 1e3
        print(f"batch {batch} {name:<6} decode {rate[batch, name]:8.1f} tokens/s ({step_ms:6.1f} ms/step, "
              f"{step_ms / (floor * 1e3):.2f}x floor)  prefill {batch * args.prompt / pre:8.0f} tokens/s")
        if name == "hf":
            print(f"batch {batch} ratio mtnlg / hf: {rate[batch, 'mtnlg'] / rate[batch, 'hf']:.2f}")


if __name__ == "__main__":
    main()
