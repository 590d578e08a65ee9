"""The training loop over this rank's model parts (mtnlg.train.parts): batches, learning-rate schedule,
evaluation, logging, checkpoints, resume."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed
from tqdm import tqdm

from mtnlg.checkpoint import (
    base_weights,
    consolidate_from_main,
    find_latest,
    load_config_file,
    load_training_checkpoint,
    mark_latest,
    prune_checkpoints,
    remove_leftovers,
    resolve_checkpoint,
    save_training_checkpoint,
)
from mtnlg.config import Config
from mtnlg.data.batch import Batch
from mtnlg.data.loader import BatchLoader, build_dataset, parse_blend
from mtnlg.errors import MtnlgError
from mtnlg.eval.harness import Options, plan, run
from mtnlg.eval.scoring import RowScorer
from mtnlg.eval.tasks import Task, load_task
from mtnlg.finetune.contrastive import Contrastive, LanguageModeling, Objective
from mtnlg.finetune.data import examples
from mtnlg.finetune.lora import with_new_adapters
from mtnlg.hardware import Precision, keep_freed_memory
from mtnlg.model.flops import model_size, peak_flops
from mtnlg.parallel import whole
from mtnlg.parallel.launch import init_distributed
from mtnlg.parallel.layout import check_pipeline_batch
from mtnlg.parallel.parallelize import Initial, new_weights
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.metrics import MetricsLogger
from mtnlg.train.optim import batch_size_at, lr_at
from mtnlg.train.parts import ModelParts


@dataclass
class TrainResult:
    step: int
    val_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None  # the signal's name when one stopped training early


class Trainer:
    """One training run. Under torchrun every rank builds one and calls `fit`; rank 0 logs and prints.

    Every rank reads the same global batch and trains on its data-parallel slice of it, so the samples
    a step sees, and the data position in a checkpoint, do not depend on the parallel layout.
    """

    def __init__(self, config: Config, resume: bool | str = False):
        """resume: False starts a new run, True continues one, "auto" continues the run directory's newest
        complete checkpoint when there is one and starts fresh otherwise (a preempted job's rerun)."""
        self.config = config
        tc = config.train
        self.run_dir = Path(tc.out_dir)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.dist = init_distributed(config.parallel, pick_device(tc.device))
        self.dims, self.device = self.dist.dims, self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()
        seq_len = config.model.max_seq_len
        self.dims.validate_model(config.model, seq_len)
        for batch_size in _ramp(tc):
            self.dims.validate_batch(batch_size, tc.micro_batch_size)
        if self.dims.pp > 1:
            check_pipeline_batch(config, self.dims.dp_size)
        self.precision = Precision.for_training(tc.dtype, self.device)

        if self.dist.is_main:
            remove_leftovers(self.checkpoints_dir)  # of a save that was killed
        self.resumed_from = resume_from = self._checkpoint_to_resume(resume)
        # Fine-tuning (or continued pretraining) starts from a base model's weights and tokenizer.
        self.base = resolve_checkpoint(config.finetune.base) if config.finetune.base else None
        if self.base is not None and load_config_file(self.base).lora.r:
            raise MtnlgError(f"{self.base} holds LoRA adapters, not a whole model; mtnlg merge it into one and start "
                             "from that")
        if config.lora.r and self.base is None:
            raise MtnlgError("lora.r > 0 trains adapters on a base model; pass one (mtnlg finetune BASE, or --finetune.base)")
        self.tokenizer = Tokenizer.load(resume_from or self.base or self._tokenizer_path())
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise MtnlgError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{config.model.vocab_size}; set --model.vocab_size {_round_up(self.tokenizer.vocab_size, 128)}"
            )
        self.eval_tasks, self.eval_options = _eval_tasks(config)
        self.eval_plan = plan(self.eval_tasks, self.tokenizer, seq_len, self.eval_options)  # checked before step 1
        self.objective: Objective = LanguageModeling()
        if config.finetune.data:
            self.train_data, self.val_data = examples(config.finetune, self.tokenizer, seq_len, tc.seed)
            if self.train_data.contrastive:
                self._check_contrastive()
                self.objective = Contrastive(config.finetune.temperature)
        else:
            self.train_data = build_dataset(tc.data, "train", seq_len, tc.seed)
            self.val_data = build_dataset(tc.data, "val", seq_len, tc.seed) if self._has_val_split() else None

        torch.manual_seed(tc.seed)  # dropout; the weights are drawn per (seed, parameter name)
        self.parts = ModelParts(config, self.dist, self.precision, self._first_weights(resume_from), self.objective)
        self.loader = BatchLoader(self.train_data, **self._batch_shape())
        self.step = 0
        if resume_from is not None:
            self._load(resume_from)
        self.flops_per_token = model_size(config.model, seq_len).flops_per_token
        self.stop_signal: str | None = None

    # ----- setup helpers -----

    def _first_weights(self, resume_from: Path | None) -> Initial | None:
        """Where the parameters' first values come from: new ones, or the base model's (with new adapters);
        None when the checkpoint to resume holds every weight."""
        tc, lora = self.config.train, self.config.lora
        if resume_from is not None and not lora.r:
            return None
        first = base_weights(self.base) if self.base is not None else new_weights(tc.seed)
        return with_new_adapters(first, tc.seed) if lora.r else first

    def _check_contrastive(self) -> None:
        """Pairs are pooled over whole sequences, which tensor and pipeline parallelism cut apart, and each query
        is told from the other passages of its micro-batch, which must hold distinct pairs."""
        rows = self.config.train.micro_batch_size
        if self.dims.tp > 1 or self.dims.pp > 1:
            raise MtnlgError("contrastive pairs train with data parallelism only; set --parallel.tp 1 --parallel.pp 1")
        if self.eval_tasks:
            raise MtnlgError("eval.tasks score a language model, not an embedder; drop [eval] tasks for contrastive pairs")
        if rows < 2:
            raise MtnlgError("contrastive pairs need train.micro_batch_size 2 or more: a query learns against the other "
                             "passages of its micro-batch")
        if self.val_data is not None and len(self.val_data.examples) < rows:
            raise MtnlgError("contrastive validation needs a micro-batch of distinct pairs: finetune.val_fraction holds "
                             f"out {len(self.val_data.examples)}, train.micro_batch_size is {rows}; hold out more or "
                             "set --finetune.val_fraction 0")

    def _tokenizer_path(self) -> Path:
        tc = self.config.train
        if not tc.data:
            raise MtnlgError("train.data is empty; pass --train.data PREFIX as written by `mtnlg prepare`")
        return Path(tc.tokenizer) if tc.tokenizer else Path(parse_blend(tc.data)[0][1]).parent

    def _has_val_split(self) -> bool:
        return all(Path(prefix + "_val.idx").is_file() for _, prefix in parse_blend(self.config.train.data))

    def _checkpoint_to_resume(self, resume: bool | str) -> Path | None:
        latest = find_latest(self.checkpoints_dir)
        if resume == "auto":
            resume = latest is not None
        if resume and latest is None:
            raise MtnlgError(f"nothing to resume: {self.checkpoints_dir} holds no checkpoint; drop --resume to start")
        if not resume and latest is not None:
            raise MtnlgError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it "
                f"or choose a new --train.out_dir"
            )
        if latest is not None:  # the sections that decide what the checkpoint holds and which samples come next
            saved, wanted = load_config_file(latest).to_dict(), self.config.to_dict()
            changed = [
                f"{section}.{k}: checkpoint {saved[section][k]!r}, config {v!r}"
                for section in ("model", "finetune", "lora")
                for k, v in wanted[section].items()
                if saved[section][k] != v
            ]
            if changed:
                raise MtnlgError(
                    f"cannot resume {latest}: the config differs ({'; '.join(changed)}); "
                    "use the checkpoint's [model], [finetune] and [lora] settings or a new --train.out_dir"
                )
        return latest

    def _load(self, checkpoint: Path) -> None:
        state = load_training_checkpoint(checkpoint, self.parts.pairs)
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # ----- the loop -----

    def fit(self) -> TrainResult:
        tc = self.config.train
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLogger(self.run_dir, tc.tensorboard, resume_step=self.step) if main else None
        peak = peak_flops(self.device, self.precision.compute) * self.dims.cfg.world_size
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (tc.progress and main), unit="step", dynamic_ncols=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        checkpoint, val_loss, stopping = None, None, self._stopping()
        try:
            while self.step < tc.max_steps and not stopping:
                start = time.perf_counter()
                loss, grad_norm, batch_size, tokens, lr = self.train_step()
                elapsed = time.perf_counter() - start
                self.step += 1
                tokens_per_s = tokens / elapsed
                record = dict(
                    loss=loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    batch_size=batch_size,
                    tokens_per_s=tokens_per_s,
                    mfu=tokens_per_s * self.flops_per_token / peak,
                    consumed_samples=self.loader.consumed_samples,
                )
                if metrics and (self.step % tc.log_interval == 0 or self.step == tc.max_steps):
                    metrics.log(self.step, **record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{tokens_per_s:.0f}", mfu=f"{record['mfu']:.0%}")
                if tc.eval_interval and (self.step % tc.eval_interval == 0 or self.step == tc.max_steps):
                    if self.val_data is not None:
                        val_loss = self.evaluate()
                        if metrics:  # a contrastive loss has no perplexity
                            ppl = {} if isinstance(self.objective, Contrastive) else {"val_ppl": math.exp(min(val_loss, 50))}
                            metrics.log(self.step, val_loss=val_loss, **ppl)
                            bar.write(f"step {self.step}: validation loss {val_loss:.4f}"
                                      + "".join(f", perplexity {v:.2f}" for v in ppl.values()))
                    if self.eval_tasks:
                        scores = self.evaluate_tasks()
                        if metrics:
                            metrics.log(self.step, **scores)
                            bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                stopping = self._stopping()
                if (tc.save_interval and self.step % tc.save_interval == 0) or self.step == tc.max_steps or stopping:
                    checkpoint = self.save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            bar.close()
            if metrics:
                metrics.close()
        return TrainResult(self.step, val_loss, checkpoint, self.stop_signal)

    def train_step(self) -> tuple[float, float, int, int, float]:
        """One optimizer step over a global batch, this rank training on its slice of it; returns the loss,
        the gradient norm, the batch size, its tokens and the learning rate."""
        tc = self.config.train
        batch_size = batch_size_at(self.loader.consumed_samples, tc)
        batch = self.loader.next_batch(batch_size)
        lr = lr_at(self.step, tc)
        loss, grad_norm = self.parts.train_step(
            self._my_rows(batch), self._denominator(batch), lr, tc.grad_clip if tc.grad_clip > 0 else math.inf
        )
        return self._mean_over_ranks(loss), float(whole(grad_norm)), batch_size, batch.inputs.numel(), lr

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss over the first `eval_batches` validation batches of train.global_batch_size samples, cut over
        the data-parallel ranks as training cuts its batches: the same samples, and the same number, under
        every layout."""
        tc = self.config.train
        loader = BatchLoader(self.val_data, **self._batch_shape())
        batches = [loader.next_batch(tc.global_batch_size) for _ in range(tc.eval_batches)]
        denominator = self._denominator(*batches)
        total = torch.zeros((), device=self.device)
        for batch in batches:
            total += self.parts.evaluate(self._my_rows(batch), denominator)
        return self._mean_over_ranks(total)

    def _batch_shape(self) -> dict[str, int]:
        """Sequence parallelism splits the sequence over the tp ranks; pipeline stages keep one shape."""
        return {"multiple": self.dims.tp if self.dims.sequence_parallel else 1,
                "length": self.config.model.max_seq_len if self.dims.pp > 1 else 0}

    def _denominator(self, *batches: Batch) -> float:
        """What each data-parallel rank divides its summed loss by, so that their mean (the gradient sync's) is
        the loss per counted target (or pair) of the whole batch (or batches)."""
        return max(sum(self.objective.count(b) for b in batches), 1) / self.dims.dp_size

    @torch.no_grad()
    def evaluate_tasks(self) -> dict[str, float]:
        """The `[eval]` tasks on the model as this run lays it out: each data-parallel rank scores its share of
        the documents in [rows, seq_len] batches of one evaluation forward, and all get the whole result.
        Keys are "task/metric" (standard errors left out)."""
        scorer = RowScorer(self.parts.token_scores, self.config.model.max_seq_len, self.parts.schedule.eval_rows, self.device)
        ranks = (self.dims.dp_rank(self.dist.rank), self.dims.dp_size)
        results = run(scorer, self.tokenizer, self.eval_tasks, self.eval_plan, self.eval_options, ranks)
        return {f"{r.task.name}/{m}": v for r in results for m, v in r.metrics.items() if not m.endswith("_stderr")}

    def _my_rows(self, batch: Batch) -> Batch:
        return batch.rows(self.dims.batch_slice(batch.inputs.size(0), self.dist.rank)).to(self.device)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        """Ranks of one tensor-parallel group hold the same value, so the mean over all ranks is the
        mean over data-parallel slices."""
        if self.dist.mesh is not None:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.dims.cfg.world_size
        return value.item()

    def _stopping(self) -> bool:
        """Whether a signal reached any rank: all ranks must stop (and save) at the same step."""
        stop = self.stop_signal is not None
        if self.dist.mesh is not None:
            flag = torch.tensor(float(stop), device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            self.stop_signal = self.stop_signal or ("SIGTERM" if stop else None)
        return stop

    def save(self) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        tc = self.config.train
        checkpoint = save_training_checkpoint(
            self.checkpoints_dir / f"step_{self.step:08d}", self.parts.pairs, self.config, self.tokenizer, state,
            self.dist.is_main,
        )
        if self.dist.is_main:
            mark_latest(checkpoint)
            prune_checkpoints(self.checkpoints_dir, tc.keep_last)
        if not self.config.lora.r and (tc.consolidate == "every" or (tc.consolidate == "end" and self.step == tc.max_steps)):
            consolidate_from_main(checkpoint, self.dist.is_main)  # once the checkpoint is complete and latest
        return checkpoint

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signal.Signals(signum).name  # finish the step, save, then stop


def _eval_tasks(config: Config) -> tuple[list[Task], Options]:
    """The `[eval]` tasks and how to run them, read (and their mistakes reported) before the first step."""
    ec = config.eval
    if ec.tasks and not config.train.eval_interval:
        raise MtnlgError("eval.tasks run every train.eval_interval steps, which is 0; set it, or drop [eval] tasks")
    tasks = [load_task(spec) for spec in ec.tasks]
    for task in tasks:
        if task.kind == "generate_until":
            raise MtnlgError(f"eval.tasks: {task.name} generates text, which training does not run; score it on a "
                             "checkpoint with mtnlg eval, or drop it from [eval] tasks")
    return tasks, Options(num_fewshot=ec.num_fewshot, seed=ec.fewshot_seed, limit=ec.limit or None, progress=False)


def pick_device(name: str, setting: str = "--train.device") -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; asking for CUDA without one is a user error, named
    by the `setting` it came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MtnlgError(f"{setting} is cuda but no CUDA GPU is visible; use {setting} cpu or auto")
    return torch.device(name)


def _ramp(tc) -> range:
    """Every global batch size the run will use (one, without batch-size ramp-up)."""
    if not tc.rampup_start:
        return range(tc.global_batch_size, tc.global_batch_size + 1)
    return range(tc.rampup_start, tc.global_batch_size + 1, tc.rampup_increment)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
