"""Metrics a user can plot: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtnlg.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            _drop_records_after(self.path, resume_step)  # those steps are about to be run again
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, **values: Any) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _drop_records_after(path: Path, step: int) -> None:
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw training and validation loss against step into a PNG beside the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"mtnlg: {run_dir}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
