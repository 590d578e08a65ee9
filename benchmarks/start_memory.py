"""Peak memory of each rank when a large model starts training: the Trainer built, before the first step.

The model is built on the meta device, laid out, and only then given memory (mtnlg.train.parts), so a rank
should hold its shards plus about one whole parameter. Run on CPU with gloo:

    python benchmarks/start_memory.py                       # llama-1b, tp=2
    python benchmarks/start_memory.py --preset llama2-7b --layout dp_shard=2

Prints each rank's peak RSS against the budget "half the whole model's fp32 bytes + 1 GiB".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp

GiB = 2**30


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mtnlg.config import load_config
    from mtnlg.parallel.launch import leave
    from mtnlg.train.trainer import Trainer

    baseline = _rss()
    trainer = Trainer(load_config(None, overrides))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = [p.to_local() if hasattr(p, "to_local") else p for m in trainer.parts.modules for p in m.parameters()]
    params = sum(p.numel() for p in held)
    Path(out, f"rank{rank}.json").write_text(json.dumps(dict(baseline=baseline, peak=peak, local_params=params)))
    leave(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--layout", default="tp=2", help="parallel sizes, e.g. tp=2 or dp_shard=2")
    args = parser.parse_args()

    from mtnlg.config import ModelConfig
    from mtnlg.data.prepare import prepare
    from mtnlg.hardware import this_cpu
    from mtnlg.model.flops import model_size
    from mtnlg.tokenizer import Tokenizer

    layout = dict(kv.split("=") for kv in args.layout.split(","))
    world = 1
    for v in layout.values():
        world *= int(v)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.txt")
        corpus.write_text("A tiny corpus: the numbers measured here do not depend on the data. " * 200)
        tokenizer = Tokenizer.train([corpus.read_text()], 300)
        tokenizer.save(tmp)
        prepare([corpus], Path(tmp, "data"), tokenizer, val_fraction=0.0, progress=False)
        overrides = [f"--model.preset={args.preset}", f"--train.data={tmp}/data", f"--train.out_dir={tmp}/run",
                     "--train.micro_batch_size=1", f"--train.global_batch_size={world}", "--train.progress=false",
                     "--train.tensorboard=false", *(f"--parallel.{k}={v}" for k, v in layout.items())]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(world, port, overrides, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]

    params = model_size(ModelConfig.from_name(args.preset)).params
    whole = 4 * params
    budget = whole / 2 + GiB
    print(f"cpu: {this_cpu().name}; {args.preset}: {params / 1e9:.2f}B parameters, {whole / GiB:.2f} GiB in fp32; "
          f"layout {args.layout}")
    for r, m in enumerate(ranks):
        print(f"rank {r}: {m['local_params'] / 1e9:.2f}B parameters held, peak RSS {m['peak'] / GiB:.2f} GiB "
              f"(after imports {m['baseline'] / GiB:.2f} GiB); budget {budget / GiB:.2f} GiB "
              f"-> {'within' if m['peak'] <= budget else 'OVER'}")
    sys.exit(0 if all(m["peak"] <= budget for m in ranks) else 1)


if __name__ == "__main__":
    main()
