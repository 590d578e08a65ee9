"""`Trainer` under torch.distributed (gloo, 2 processes): layouts train like one process, and a run
saved under one layout resumes under another with the losses an uninterrupted run would have had."""

from __future__ import annotations

import subprocess
import sys

import pytest
import safetensors.torch
import torch

from mtnlg.cli import main
from mtnlg.errors import MtnlgError
from mtnlg.train.metrics import read_metrics
from mtnlg.train.trainer import Trainer
from spawn import spawn

# LR decay is pinned so that a run stopped early follows the same schedule as the whole run.
RUN = ("--train.micro_batch_size=2", "--train.global_batch_size=4", "--train.decay_steps=6", "--train.lr=3e-3",
       "--train.eval_interval=0", "--train.save_interval=0", "--train.log_interval=1")


def _train(rank: int, config, resume: bool) -> None:
    Trainer(config, resume=resume).fit()


def train(make_config, *overrides: str, out_dir, world: int = 1, resume: bool = False) -> None:
    config = make_config(*RUN, *overrides, out_dir=out_dir)
    if world == 1:
        Trainer(config, resume=resume).fit()
        return
    spawn(_train, world, config, resume)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    diff = max(abs(got[s] - want[s]) / abs(want[s]) for s in got)
    print(f"max relative loss difference {diff:.1e} over steps {sorted(got)}")
    assert diff < 1e-5, (got, want)


@pytest.mark.slow
def test_resume_across_layouts_matches_one_uninterrupted_run(tiny_config, tmp_path):
    """tp=2 (sequence parallel) for 2 steps, then dp_shard=2 to step 4, then one process to step 6."""
    reference = tmp_path / "reference"
    train(tiny_config, "--train.max_steps=6", out_dir=reference)
    want = losses(reference)

    run = tmp_path / "run"
    train(tiny_config, "--train.max_steps=2", "--parallel.tp=2", out_dir=run, world=2)
    train(tiny_config, "--train.max_steps=4", "--parallel.dp_shard=2", out_dir=run, world=2, resume=True)
    train(tiny_config, "--train.max_steps=6", out_dir=run, resume=True)
    got = losses(run)
    assert sorted(got) == list(range(1, 7))
    assert_close(got, want)
    assert want[6] < want[1]


@pytest.mark.slow
def test_mtnlg_train_under_torchrun(tiny_data, tmp_path):
    """The launch users run: torchrun starts the ranks, only rank 0 reports, a bad layout is one line.
    DDP with two micro-batches per rank: gradients synchronise once, after the second, and the losses
    are those of one process."""
    args = ["train", "tiny", f"--train.data={tiny_data}", "--train.tensorboard=false", "--train.progress=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mtnlg", *args]
    run, reference = tmp_path / "run", tmp_path / "reference"
    steps = ("--train.max_steps=4", "--train.global_batch_size=16", "--train.micro_batch_size=4")
    done = subprocess.run(torchrun + [f"--train.out_dir={run}", *steps, "--parallel.dp_replicate=2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done: step 4") == 1
    assert (run / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    assert main([*args, f"--train.out_dir={reference}", *steps]) == 0
    assert_close(losses(run), losses(reference))

    bad = subprocess.run(torchrun + [f"--train.out_dir={tmp_path / 'bad'}", "--parallel.tp=4"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.count("tp 4 x pp 1 x dp_shard 1 x dp_replicate 1 = 4, but 2 processes are running") == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_pipeline_resumes_from_one_process_and_back(tiny_config, tmp_path):
    """One process for 2 steps, pp=2 with 1F1B to step 4 (the tied embedding split over the two stages, its
    optimizer state found under either name), one process again to step 6: one uninterrupted run's losses."""
    pipeline = ("--parallel.microbatches=2",)
    reference = tmp_path / "reference"
    train(tiny_config, "--train.max_steps=6", *pipeline, out_dir=reference)
    run = tmp_path / "run"
    train(tiny_config, "--train.max_steps=2", *pipeline, out_dir=run)
    train(tiny_config, "--train.max_steps=4", "--parallel.pp=2", *pipeline, out_dir=run, world=2, resume=True)
    train(tiny_config, "--train.max_steps=6", *pipeline, out_dir=run, resume=True)
    assert_close(losses(run), losses(reference))


def test_pipeline_rules(tiny_config):
    from mtnlg.parallel.layout import check_pipeline_batch

    ok = tiny_config("--parallel.pp=2", "--parallel.microbatches=2", "--train.global_batch_size=8")
    check_pipeline_batch(ok, dp_size=1)  # 8 samples = 2 micro-batches of 4
    with pytest.raises(MtnlgError, match=r"rank's 4 samples .* parallel.microbatches \(2\) micro-batches of "
                                         r"train.micro_batch_size \(4\).*train.global_batch_size = 16"):
        check_pipeline_batch(ok, dp_size=2)
    ramp = tiny_config("--train.rampup_start=4", "--train.rampup_increment=4", "--train.rampup_samples=64")
    with pytest.raises(MtnlgError, match="batch-size ramp-up does not work with pipeline parallelism"):
        check_pipeline_batch(ramp, dp_size=1)
    with pytest.raises(MtnlgError, match="train.compile does not apply to pipeline stages"):
        check_pipeline_batch(tiny_config("--train.compile=true"), dp_size=1)


@pytest.mark.slow
def test_fsdp_mixed_precision_trains_like_autocast(tiny_config, tmp_path):
    """bf16 through FSDP2's mixed-precision policy (the GPU path, run here on CPU): close to one process
    under bf16 autocast, and the saved weights stay fp32."""
    bf16 = ("--train.dtype=bf16", "--train.max_steps=4")
    train(tiny_config, *bf16, out_dir=tmp_path / "one")
    train(tiny_config, *bf16, "--parallel.dp_shard=2", out_dir=tmp_path / "fsdp", world=2)
    got, want = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert max(abs(got[s] - want[s]) for s in want) < 1e-2 and got[4] < got[1]
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_00000004" / "model.safetensors"
    assert {t.dtype for t in safetensors.torch.load_file(checkpoint).values()} == {torch.float32}


def task_scores(run_dir) -> dict[str, float]:
    return {k: v for r in read_metrics(run_dir) for k, v in r.items() if "/" in k}


@pytest.mark.slow
def test_eval_tasks_give_the_same_numbers_under_every_layout(tiny_config, tiny_tasks, tmp_path):
    """The [eval] tasks scored in place on the model as each layout holds it (tensor + sequence parallel,
    1F1B pipeline stages, FSDP shards whose ranks split the documents) equal one process's."""
    scored = ("--train.max_steps=2", "--train.eval_interval=2", f"--eval.tasks={','.join(tiny_tasks)}",
              "--parallel.microbatches=2")
    train(tiny_config, *scored, out_dir=tmp_path / "one")
    want = task_scores(tmp_path / "one")
    assert {"choices/acc", "choices/acc_norm", "documents/perplexity"} <= set(want)
    for layout in ("--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=2"):
        run = tmp_path / layout.split(".")[1].split("=")[0]
        train(tiny_config, *scored, layout, out_dir=run, world=2)
        got = task_scores(run)
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want), (layout, got, want)


def _compute_dtypes(rank: int, config, out: str) -> None:
    """The dtypes the matrix products of one training step produce on this rank, and the step's loss."""
    import torch.distributed as dist

    trainer = Trainer(config)
    seen = set()
    for module in trainer.parts.modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda m, args, y: seen.add(str(y.dtype)))
    loss, *_ = trainer.train_step()
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [seen]
    if dist.is_initialized():
        dist.all_gather_object(gathered, seen)
    if rank == 0:
        torch.save({"dtypes": set().union(*gathered), "loss": loss}, out)


@pytest.mark.slow
def test_pipeline_computes_in_bf16_like_one_process(tiny_config, tmp_path):
    """train.dtype = bf16: the pipeline's stages run their products under the same autocast as one process
    (the precision is applied to every model part from outside), with the same first loss."""
    config = tiny_config(*RUN, "--train.dtype=bf16", "--parallel.microbatches=2")
    _compute_dtypes(0, config, str(tmp_path / "one.pt"))
    spawn(_compute_dtypes, 2, tiny_config(*RUN, "--train.dtype=bf16", "--parallel.microbatches=2", "--parallel.pp=2",
                                          out_dir=tmp_path / "pp"), str(tmp_path / "pp.pt"))
    one, pp = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "pp.pt")
    assert one["dtypes"] == pp["dtypes"] == {"torch.bfloat16"}
    assert pp["loss"] == pytest.approx(one["loss"], rel=1e-2)
