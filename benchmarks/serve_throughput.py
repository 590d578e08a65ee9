"""Serving throughput and latency: `mtnlg serve` under 1, 4 and 16 concurrent streaming clients.

The GPT-2 124M shape with random weights, served on CPU by a `mtnlg serve` subprocess. Every concurrency
level sends the same requests: prompts of 16-512 tokens (as token ids) and 64-128 new tokens each
(end-of-text ignored, so lengths are fixed), streamed with usage. A client sends its next request when
the previous one ends. Printed per level: aggregate generated tokens/s, time to first token p50/p99, and
inter-token latency p50/p99 (the gaps between content chunks of a stream, per token). They are compared
with (a) one client, i.e. the same requests one at a time, and (b) the offline engine running all of them
batched in-process at its default budget, with no HTTP (the upper bound), at the same slot count. And the
time to first token that prefix reuse saves when requests share a long preamble (in-process, same engine).

    .venv/bin/python benchmarks/serve_throughput.py [--requests 32] [--token-budget 144] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tokenizers
import torch

import mtnlg
from mtnlg.checkpoint import save_checkpoint
from mtnlg.config import Config, ModelConfig
from mtnlg.hardware import inference_dtype, this_cpu
from mtnlg.inference.engine import Engine, Request
from mtnlg.inference.sampling import Sampling
from mtnlg.model.gpt import GPT
from mtnlg.serve.app import SERVE_PREFILL_TOKENS
from mtnlg.tokenizer import Tokenizer


def workload(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, new tokens) pairs: prompt lengths spread over 16-512, new tokens over 64-128."""
    rng = random.Random(seed)
    return [([rng.randrange(1, 50000) for _ in range(rng.randint(16, 512))], rng.randint(64, 128)) for _ in range(count)]


def word_tokenizer(size: int) -> Tokenizer:
    """A tokenizer with one word per id, so that every id the random model picks is a piece of text (a
    streamed token always shows, as with a real tokenizer and a trained model)."""
    vocab = {f" w{i}": i for i in range(size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=" w0"))
    tok.decoder = tokenizers.decoders.Fuse()
    return Tokenizer(tok)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


async def one_stream(client: httpx.AsyncClient, prompt: list[int], new: int, stats: dict) -> None:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                if last is None:
                    stats["ttft"].append(now - sent)
                else:
                    stats["itl"].append(now - last)
                last = now


async def run_clients(url: str, requests: list[tuple[list[int], int]], clients: int) -> dict:
    """`clients` concurrent streams working through the requests in order; returns the level's figures."""
    stats: dict = {"tokens": 0, "ttft": [], "itl": []}
    queue = list(reversed(requests))
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            while queue:
                prompt, new = queue.pop()
                await one_stream(client, prompt, new, stats)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        stats["seconds"] = time.perf_counter() - start
    return stats


def offline(lm: mtnlg.LanguageModel, requests: list[tuple[list[int], int]], slots: int) -> tuple[int, float]:
    """All requests through the engine in-process, batched at its default budget: (tokens, seconds)."""
    engine = Engine(lm.model, lm.tokenizer, slots)
    for prompt, new in requests:
        engine.add(Request(prompt, Sampling(max_new_tokens=new, temperature=0, ignore_eos=True), torch.Generator()))
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    return sum(new for _, new in requests), time.perf_counter() - start


def prefix_ttft(lm: mtnlg.LanguageModel, reuse: bool, budget: int, count: int = 6) -> list[float]:
    """Time to first token of requests sent one at a time that share a 448-token preamble (a system prompt)
    and differ in a 16-token question, through the engine at the server's budget."""
    rng = random.Random(1)
    preamble = [rng.randrange(1, 50000) for _ in range(448)]
    engine = Engine(lm.model, lm.tokenizer, 16, token_budget=budget, reuse_prefixes=reuse)
    times = []
    for _ in range(count):
        request = Request(preamble + [rng.randrange(1, 50000) for _ in range(16)],
                          Sampling(max_new_tokens=1, temperature=0, ignore_eos=True), torch.Generator())
        start = time.perf_counter()
        engine.add(request)
        while not request.ids:
            engine.step()
        times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--token-budget", type=int, help="the server's tokens per step (default: the server's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(this_cpu().describe())
    requests = workload(args.requests)
    prompt_lengths = [len(p) for p, _ in requests]
    print(f"{len(requests)} requests: prompts {min(prompt_lengths)}-{max(prompt_lengths)} tokens "
          f"(mean {statistics.mean(prompt_lengths):.0f}), {sum(n for _, n in requests)} new tokens in all; "
          f"{args.max_num_seqs} slots, token budget {args.token_budget or args.max_num_seqs + SERVE_PREFILL_TOKENS}, "
          f"{args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_name("gpt2")).eval()
        checkpoint = save_checkpoint(Path(tmp) / "gpt2-random", model, Config(model=model.cfg), word_tokenizer(50257))
        del model
        lm = mtnlg.load(checkpoint, "cpu", dtype=args.dtype)
        print(f"weights: {inference_dtype(args.dtype, torch.device('cpu'))} (--dtype {args.dtype})")
        tokens, seconds = offline(lm, requests, args.max_num_seqs)
        offline_rate = tokens / seconds
        print(f"offline engine, batched: {offline_rate:.1f} tokens/s ({tokens} tokens in {seconds:.1f} s)")
        budget = args.token_budget or args.max_num_seqs + SERVE_PREFILL_TOKENS
        cold, warm = (prefix_ttft(lm, reuse, budget) for reuse in (False, True))
        print(f"shared 448-token preamble, one request at a time: TTFT median {statistics.median(cold):.2f} s without "
              f"prefix reuse, {statistics.median(warm[1:]):.2f} s with it (after the first)")
        del lm

        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen(
            [sys.executable, "-m", "mtnlg", "serve", str(checkpoint), "--port", str(port), "--dtype", args.dtype,
             "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.requests),
             *(["--token-budget", str(args.token_budget)] if args.token_budget else [])], env=env, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, "the server exited"
                time.sleep(0.5)
            rows = {}
            for clients in args.clients:
                rows[clients] = asyncio.run(run_clients(url, requests, clients))
        finally:
            server.terminate()
            server.wait(timeout=60)

    single = rows[min(rows)]
    single_rate = single["tokens"] / single["seconds"]
    print(f"\n{'clients':>7} {'tokens/s':>9} {'x one':>6} {'x offline':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'p99/p50':>7}")
    for clients, s in rows.items():
        rate = s["tokens"] / s["seconds"]
        p50, p99 = percentile(s["itl"], 50), percentile(s["itl"], 99)
        print(f"{clients:>7} {rate:>9.1f} {rate / single_rate:>6.2f} {rate / offline_rate:>9.2f} "
              f"{percentile(s['ttft'], 50):>8.2f}s {percentile(s['ttft'], 99):>8.2f}s "
              f"{p50 * 1e3:>6.0f}ms {p99 * 1e3:>6.0f}ms {p99 / p50:>7.2f}")


if __name__ == "__main__":
    main()
