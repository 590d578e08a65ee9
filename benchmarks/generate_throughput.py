"""Decode throughput: mtnlg's generate against Hugging Face `generate` and, when installed (the `bench` extra),
CTranslate2 in fp32 and int8 and ONNX Runtime in fp32 (`engine_peers.py`, each in a process of its own), on
the GPT-2 124M shape.

Random weights (throughput does not depend on their values), greedy, KV cache on both sides, a 32-token
prompt and 128 new tokens (end-of-text ignored, so every run is full length), batch 1 and batch 8,
alternating in one process. The floor is the time to read every weight once per decode step at the
memory bandwidth measured in the same run (the best of a streaming read taken before every round, so
a quiet moment on a shared machine makes the floor stricter, never looser): at batch 1 decoding can't
beat it. Under each of our decodes, the step is split into its matrix products run back to back with
nothing between them (best of 5) and the rest (attention over the cache, norms, activations, Python, and
whatever the products lose to the work between them): the kernels' share and ours.

    .venv/bin/python benchmarks/generate_throughput.py
    python benchmarks/generate_throughput.py --device cuda --batches 1 8 64   # bf16 on a GPU (gpu_check.sh)

It prints the CPU, its flags and the fast paths they allow first, and skips (saying why) a contestant this
CPU cannot run: `mtnlg-bf16` needs bf16 instructions, `mtnlg-int8` (FBGEMM's int8 products) x86 with AVX2;
without the packed path `mtnlg` is the plain model,
as `mtnlg.load` would give it. On CUDA both sides run in bf16 and the products-alone split is left out.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

import engine_peers
from mtnlg.config import ModelConfig
from mtnlg.hardware import this_cpu
from mtnlg.inference.cpu import PackedLinear, Slice, pack_for_cpu_inference
from mtnlg.inference.generate import Sampling, generate
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.tokenizer import Tokenizer


def measure_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Bytes/s of reading a large fp32 tensor once (the access pattern of a decode step's weights)."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    return x.numel() * 4 / min(timed(x.sum, device) for _ in range(5))


def products(model: torch.nn.Module) -> list[PackedLinear]:
    """Every packed product of the model once, those behind slices included (slices of one share it)."""
    packed = [m.packed[0] if isinstance(m, Slice) else m for m in model.modules() if isinstance(m, (PackedLinear, Slice))]
    return list({id(m): m for m in packed}.values())


def bytes_per_step(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every matrix product's weights (the tied LM head's included) and
    every other parameter except the two embedding tables, of which a step reads one row each."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tensors = {id(t): t for m in linears for t in (m.weight, m.bias) if t is not None}
    rest = [p for name, p in model.named_parameters() if id(p) not in tensors and not name.endswith("_emb.weight")]
    return sum(m.nbytes for m in products(model)) + sum(t.numel() * t.element_size() for t in [*tensors.values(), *rest])


def products_alone_time(model: torch.nn.Module, cfg: ModelConfig, prompts: torch.Tensor) -> float:
    """Seconds the matrix products of one decode step take when run back to back, on the inputs they had
    in the step, with nothing between them (best of 5)."""
    cache = KVCache(cfg, prompts.size(0), prompts.size(1) + 1, "cpu", torch.float32)
    model(prompts, cache=cache, last_only=True)
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0]))) for m in products(model)]
    model(prompts[:, -1:], cache=cache)
    for hook in hooks:
        hook.remove()
    return min(timed(lambda: [m(x) for m, x in calls]) for _ in range(5))


def timed(fn, device: torch.device = torch.device("cpu")) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: both sides in bf16 on the GPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", vocab_size=50257)
    plain = GPT(cfg).eval()
    hf = GPT2LMHeadModel(GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12)).eval()
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
        dtype, models = torch.bfloat16, {"mtnlg": plain.to(device, torch.bfloat16)}
        hf = hf.to(device, torch.bfloat16)
    else:  # what mtnlg.load does on this CPU, with fp32 and, where the CPU has them, bf16 weights
        cpu = this_cpu()
        print(cpu.describe())
        dtype, models = torch.float32, {"mtnlg": pack_for_cpu_inference(copy.deepcopy(plain))}
        if cpu.bf16:
            models["mtnlg-bf16"] = pack_for_cpu_inference(copy.deepcopy(plain), torch.bfloat16)
        else:
            print(f"skipping mtnlg-bf16: this CPU lacks {cpu.missing_bf16()}")
        if cpu.int8:
            models["mtnlg-int8"] = pack_for_cpu_inference(copy.deepcopy(plain), torch.int8)
        else:
            print("skipping mtnlg-int8: FBGEMM's int8 products need x86 with AVX2")
    step_bytes = {name: bytes_per_step(model) for name, model in models.items()}
    step_bytes["hf"] = step_bytes["mtnlg"]
    scratch = Path(tempfile.mkdtemp())
    names = engine_peers.available() if device.type == "cpu" else []
    engine_peers.convert(hf, scratch, names)
    peers = {name: engine_peers.Peer(name, scratch, args.threads) for name in names}
    step_bytes.update({name: step_bytes["mtnlg"] // (4 if name.endswith("int8") else 1) for name in peers})
    tokenizer = Tokenizer.train(["benchmark"], 300)
    params = Sampling(temperature=0, max_new_tokens=args.new, ignore_eos=True)
    bandwidths = [measure_bandwidth(device)]

    print(f"GPT-2 124M shape, {str(dtype).removeprefix('torch.')} activations, {args.threads} threads, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, torch {torch.__version__}")
    results = []
    for batch in args.batches:
        prompts = torch.randint(0, 300, (batch, args.prompt), device=device)
        runs = {name: partial(generate, model, tokenizer, prompts.tolist(), params) for name, model in models.items()}
        runs["hf"] = lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                         max_new_tokens=args.new, min_new_tokens=args.new, use_cache=True,
                                         pad_token_id=0)
        prefill = {  # a fresh cache each call; logits of the last position only, as both generates ask
            name: lambda model=model: model(prompts, cache=KVCache(cfg, batch, args.prompt, device, dtype), last_only=True)
            for name, model in models.items()
        }
        prefill["hf"] = lambda: hf(prompts, use_cache=True, logits_to_keep=1)
        for name, peer in peers.items():
            runs[name] = partial(peer.generate, prompts.tolist(), args.new)
            prefill[name] = partial(peer.prefill, prompts.tolist())
        totals: dict[str, list[float]] = {name: [] for name in runs}
        prefills: dict[str, list[float]] = {name: [] for name in runs}
        packed = {name: model for name, model in models.items() if products(model)}
        alone: dict[str, list[float]] = {name: [] for name in packed}
        with torch.no_grad():
            for name in runs:  # warm up
                runs[name]()
            for _ in range(args.rounds):
                bandwidths.append(measure_bandwidth(device))
                for name in runs:
                    prefills[name].append(min(timed(prefill[name], device) for _ in range(3)))
                    totals[name].append(timed(runs[name], device))
                for name, model in packed.items():
                    alone[name].append(products_alone_time(model, cfg, prompts))
        for name in runs:
            total, pre = statistics.median(totals[name]), statistics.median(prefills[name])
            products_time = statistics.median(alone[name]) if name in alone else None
            results.append((batch, name, total - pre, pre, products_time))

    bandwidth = max(bandwidths)
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (best of {len(bandwidths)} streaming reads, "
          f"{min(bandwidths) / 1e9:.1f} the worst)")
    for name in [*models, *peers]:
        floor = step_bytes[name] / bandwidth
        print(f"{name:<10} reads {step_bytes[name] / 1e6:.0f} MB per step -> floor {floor * 1e3:.1f} ms/step = "
              f"{1 / floor:.1f} tokens/s at batch 1")
    rate, prefill_rate = {}, {}
    for batch, name, decode, pre, products_time in results:
        rate[batch, name], prefill_rate[batch, name] = batch * args.new / decode, batch * args.prompt / pre
        step_ms = decode / args.new * 1e3
        floor_ms = step_bytes[name] / bandwidth * 1e3
        print(f"batch {batch} {name:<10} decode {rate[batch, name]:8.1f} tokens/s ({step_ms:6.1f} ms/step, "
              f"{step_ms / floor_ms:.2f}x its floor)  prefill {prefill_rate[batch, name]:8.0f} tokens/s")
        if products_time is not None:
            alone_ms = products_time * 1e3
            print(f"{'':19}matrix products alone {alone_ms:5.1f} ms/step ({alone_ms / floor_ms:.2f}x the floor, "
                  f"the step {step_ms / alone_ms:.2f}x them), the rest of a step {step_ms - alone_ms:4.1f} ms")
        if name == [*models, "hf", *peers][-1]:
            pairs = [(ours, "hf") for ours in models] + [(ours, peer) for peer in peers for ours in models
                                                          if ours.endswith("int8") == peer.endswith("int8")]
            for what, rates in (("decode", rate), ("prefill", prefill_rate)):
                print(f"batch {batch} {what} ratio " + "; ".join(
                    f"{ours} / {peer}: {rates[batch, ours] / rates[batch, peer]:.2f}" for ours, peer in pairs))
    for peer in peers.values():
        peer.close()
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
