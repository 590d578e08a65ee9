"""What an evaluation leaves behind, in the shapes lm-evaluation-harness users read: a results JSON with
"metric,none" keys, per-sample JSONL, and a table for the terminal."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mtnlg
from mtnlg.eval.harness import HIGHER_IS_BETTER, METRICS, Options, TaskResult
from mtnlg.files import write_text_atomic

FILTER = "none"  # lm-eval's name for "no filter applied", part of every metric key


def results_json(results: Sequence[TaskResult], model: str, options: Options, config: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    """lm-eval's results layout (results, n-shot, configs, config, ...) plus MT-NLG 530B's reference scores."""
    out: dict[str, Any] = {"results": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}, "n-samples": {},
                           "configs": {}, "reference": {}}
    for r in results:
        name = r.task.name
        out["results"][name] = {"alias": name, **{f"{k},{FILTER}": _finite(v) for k, v in r.metrics.items()}}
        out["versions"][name] = 1
        out["n-shot"][name] = r.num_fewshot
        out["higher_is_better"][name] = {m: HIGHER_IS_BETTER.get(m, False) for m in METRICS[r.task.kind] if m in r.metrics}
        out["n-samples"][name] = {"original": len(r.task.docs), "effective": len(r.samples)}
        out["configs"][name] = {
            "task": name, "output_type": r.task.kind, "dataset_path": r.task.path, "num_fewshot": r.num_fewshot,
            "fewshot_seed": options.seed, "description": r.task.description,
            "target_delimiter": r.task.target_delimiter, "fewshot_delimiter": r.task.fewshot_delimiter,
            "metric_list": [{"metric": m, "aggregation": how, "higher_is_better": HIGHER_IS_BETTER.get(m, False)}
                            for m, how in METRICS[r.task.kind].items() if m in r.metrics],
        }
        if r.task.reference:
            metric, score = r.task.reference
            out["reference"][name] = {"model": "MT-NLG 530B (zero-shot)", "metric": metric, "value": score}
    return {**out, "config": {"model": "mtnlg", "model_args": f"path={model}", **config, "limit": options.limit},
            "model_name": model, "git_hash": _git_hash(), "mtnlg_version": mtnlg.__version__, "date": time.time(),
            "total_evaluation_time_seconds": f"{seconds:.2f}"}


def write_results(path: Path, results: dict[str, Any], task_results: Sequence[TaskResult], samples: bool) -> Path:
    """Write the results JSON (to PATH, or PATH/results.json for a folder) and, with `samples`, one
    samples_TASK.jsonl per task beside it; every file atomically. Returns the results file."""
    file = path / "results.json" if path.is_dir() or not path.suffix else path
    file.parent.mkdir(parents=True, exist_ok=True)
    if samples:
        for r in task_results:
            lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in r.samples)
            write_text_atomic(file.parent / f"samples_{r.task.name}.jsonl", lines)
    return write_text_atomic(file, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def format_table(results: Sequence[TaskResult]) -> str:
    """Task, shots, metric, value ± standard error, and MT-NLG 530B's score where the paper gives one (the
    column only when a task has one)."""
    with_reference = any(r.task.reference for r in results)
    rows = [("task", "n-shot", "metric", "value", "± stderr", "MT-NLG 530B")]
    for r in results:
        first = True
        for metric, value in r.metrics.items():
            if metric.endswith("_stderr"):
                continue
            stderr = r.metrics.get(f"{metric}_stderr")
            reference = f"{r.task.reference[1]:.3f}" if r.task.reference and r.task.reference[0] == metric else ""
            rows.append((r.task.name if first else "", str(r.num_fewshot) if first else "", metric, f"{value:.4f}",
                         f"± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else "", reference))
            first = False
    rows = [row if with_reference else row[:-1] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _finite(value: float) -> float | None:
    """JSON has no NaN: a standard error that does not exist (one sample) is null."""
    return value if math.isfinite(value) else None


def _git_hash() -> str | None:
    """The commit of the mtnlg source that ran, when it runs from mtnlg's own checkout (src/mtnlg/eval/ here):
    an installed copy inside someone else's repository has none."""
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[1] if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == root else None
