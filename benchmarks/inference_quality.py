"""The quality cost of the inference dtypes: the demo model's validation perplexity with fp32, bf16 and int8
weights, through `mtnlg eval --perplexity`, each with its change from fp32 (issue 15 asks int8 within 1%).

    make demo   # once: trains runs/demo
    .venv/bin/python benchmarks/inference_quality.py [--run runs/demo]

A dtype this CPU has no path for is skipped, saying why.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mtnlg.cli import main as mtnlg
from mtnlg.hardware import this_cpu


def perplexity(run: Path, dtype: str, scratch: Path) -> float:
    out = scratch / f"{dtype}.json"
    if mtnlg(["eval", str(run / "run"), "--perplexity", str(run / "data" / "corpus_val"), "--dtype", dtype,
              "--output", str(out)]) != 0:
        raise SystemExit(f"mtnlg eval failed for {dtype}")
    return json.loads(out.read_text())["results"]["corpus_val"]["perplexity,none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo's folder (make demo)")
    args = parser.parse_args()
    if not (args.run / "run").is_dir():
        raise SystemExit(f"no demo model in {args.run}/run: run `make demo` first")
    cpu = this_cpu()
    print(cpu.describe())
    dtypes = ["fp32"] + (["bf16"] if cpu.bf16 else []) + (["int8"] if cpu.int8 else [])
    for dtype, has in (("bf16", cpu.bf16), ("int8", cpu.int8)):
        if not has:
            print(f"skipping {dtype}: this CPU has no {dtype} path")
    with tempfile.TemporaryDirectory() as scratch:
        results = {dtype: perplexity(args.run, dtype, Path(scratch)) for dtype in dtypes}
    for dtype, value in results.items():
        change = value / results["fp32"] - 1
        print(f"validation perplexity {dtype:<5} {value:10.4f}  ({change:+.3%} from fp32)")


if __name__ == "__main__":
    main()
