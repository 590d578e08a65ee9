"""The training loop: accumulate micro-batches, clip, step, schedule, evaluate, log, checkpoint, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mtnlg.config import Config
from mtnlg.data.loader import BatchLoader, build_dataset, parse_blend
from mtnlg.errors import MtnlgError
from mtnlg.model.flops import model_size, peak_flops
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.checkpoint import (
    find_latest,
    load_config_file,
    load_weights,
    mark_latest,
    prune_checkpoints,
    save_checkpoint,
)
from mtnlg.train.metrics import MetricsLogger
from mtnlg.train.optim import batch_size_at, build_optimizer, lr_at


@dataclass
class TrainResult:
    step: int
    val_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None  # the signal's name when one stopped training early


class Trainer:
    def __init__(self, config: Config, resume: bool = False):
        self.config = config
        tc = config.train
        self.run_dir = Path(tc.out_dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.device = pick_device(tc.device)
        bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        resume_from = self._checkpoint_to_resume(resume)
        self.tokenizer = Tokenizer.load(resume_from or self._tokenizer_path())
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise MtnlgError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{config.model.vocab_size}; set --model.vocab_size {_round_up(self.tokenizer.vocab_size, 128)}"
            )
        seq_len = config.model.max_seq_len
        self.train_data = build_dataset(tc.data, "train", seq_len, tc.seed)
        self.val_data = build_dataset(tc.data, "val", seq_len, tc.seed) if self._has_val_split() else None

        torch.manual_seed(tc.seed)
        with torch.device(self.device):
            self.model = GPT(config.model)
        self.model.activation_checkpointing = tc.activation_checkpointing
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.optimizer = build_optimizer(self.model, tc, fused=self.device.type == "cuda")
        self.loader = BatchLoader(self.train_data)
        self.step = 0
        if resume_from is not None:
            self._load(resume_from)
        self.flops_per_token = model_size(config.model, seq_len).flops_per_token
        self.stop_signal: str | None = None

    # ----- setup helpers -----

    def _tokenizer_path(self) -> Path:
        tc = self.config.train
        if not tc.data:
            raise MtnlgError("train.data is empty; pass --train.data PREFIX as written by `mtnlg prepare`")
        return Path(tc.tokenizer) if tc.tokenizer else Path(parse_blend(tc.data)[0][1]).parent

    def _has_val_split(self) -> bool:
        return all(Path(prefix + "_val.idx").is_file() for _, prefix in parse_blend(self.config.train.data))

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        latest = find_latest(self.checkpoints_dir)
        if resume and latest is None:
            raise MtnlgError(f"nothing to resume: {self.checkpoints_dir} holds no checkpoint; drop --resume to start")
        if not resume and latest is not None:
            raise MtnlgError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it "
                f"or choose a new --train.out_dir"
            )
        if latest is not None:
            saved = dataclasses.asdict(load_config_file(latest).model)
            wanted = dataclasses.asdict(self.config.model)
            changed = [f"model.{k}: checkpoint {saved[k]!r}, config {wanted[k]!r}" for k in saved if saved[k] != wanted[k]]
            if changed:
                raise MtnlgError(
                    f"cannot resume {latest}: the model config differs ({'; '.join(changed)}); "
                    "use the checkpoint's [model] settings or a new --train.out_dir"
                )
        return latest

    def _load(self, checkpoint: Path) -> None:
        load_weights(self.model, checkpoint)
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=self.device, weights_only=True))
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # ----- the loop -----

    def fit(self) -> TrainResult:
        tc = self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLogger(self.run_dir, tc.tensorboard, resume_step=self.step)
        peak = peak_flops(self.device, self.compute_dtype)
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not tc.progress, unit="step", dynamic_ncols=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        checkpoint, val_loss = None, None
        try:
            while self.step < tc.max_steps and self.stop_signal is None:
                start = time.perf_counter()
                loss, grad_norm, batch_size = self.train_step()
                elapsed = time.perf_counter() - start
                self.step += 1
                tokens_per_s = batch_size * self.config.model.max_seq_len / elapsed
                record = dict(
                    loss=loss,
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm,
                    batch_size=batch_size,
                    tokens_per_s=tokens_per_s,
                    mfu=tokens_per_s * self.flops_per_token / peak,
                    consumed_samples=self.loader.consumed_samples,
                )
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    metrics.log(self.step, **record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{tokens_per_s:.0f}", mfu=f"{record['mfu']:.0%}")
                if self.val_data is not None and tc.eval_interval and (
                    self.step % tc.eval_interval == 0 or self.step == tc.max_steps
                ):
                    val_loss = self.evaluate()
                    metrics.log(self.step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                    bar.write(f"step {self.step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                if (tc.save_interval and self.step % tc.save_interval == 0) or self.step == tc.max_steps or self.stop_signal:
                    checkpoint = self.save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            bar.close()
            metrics.close()
        return TrainResult(self.step, val_loss, checkpoint, self.stop_signal)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over a global batch, accumulated in micro-batches."""
        tc = self.config.train
        batch_size = batch_size_at(self.loader.consumed_samples, tc)
        micro_steps = batch_size // tc.micro_batch_size
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for _ in range(micro_steps):
            inputs, targets = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch(tc.micro_batch_size))
            with self.autocast:
                loss = cross_entropy(self.forward(inputs), targets) / micro_steps
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm.item(), batch_size

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` validation micro-batches: the same tokens every time."""
        tc = self.config.train
        self.model.eval()
        loader = BatchLoader(self.val_data)
        losses = []
        for _ in range(tc.eval_batches):
            inputs, targets = (t.to(self.device) for t in loader.next_batch(tc.micro_batch_size))
            with self.autocast:
                losses.append(cross_entropy(self.forward(inputs), targets).item())
        return sum(losses) / len(losses)

    def save(self) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        checkpoint = save_checkpoint(
            self.checkpoints_dir / f"step_{self.step:08d}", self.model, self.config, self.tokenizer, self.optimizer, state
        )
        mark_latest(checkpoint)
        prune_checkpoints(self.checkpoints_dir, self.config.train.keep_last)
        return checkpoint

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signal.Signals(signum).name  # finish the step, save, then stop


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MtnlgError("train.device is cuda but no CUDA GPU is visible; use --train.device cpu or auto")
    return torch.device(name)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
