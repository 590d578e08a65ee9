import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from mtnlg.errors import MtnlgError
from mtnlg.train.checkpoint import find_latest, load_model
from mtnlg.train.metrics import read_metrics
from mtnlg.train.trainer import Trainer


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_loss_falls_and_metrics_are_written(tiny_config, tmp_path):
    cfg = tiny_config("--train.max_steps=30", "--train.lr=3e-3", "--train.eval_interval=15", "--train.tensorboard=true")
    result = Trainer(cfg).fit()
    records = read_metrics(cfg.train.out_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "batch_size"} <= set(train[0])
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    assert result.val_loss is not None and result.step == 30
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step_00000030"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def stop_after(trainer, steps):
    """Ask the trainer to stop after `steps`, as SIGTERM does: it finishes the step and checkpoints."""
    step = trainer.train_step

    def counting_step():
        if trainer.step + 1 == steps:
            trainer.stop_signal = "SIGTERM"
        return step()

    trainer.train_step = counting_step
    return trainer


def test_resume_is_bit_exact(tiny_config, tmp_path):
    """20 steps straight equal 10 steps, a stop, and 10 more resumed: every loss, bit for bit."""
    common = ("--train.max_steps=20", "--train.save_interval=0", "--model.dropout=0.1")
    Trainer(tiny_config(*common, out_dir=tmp_path / "straight")).fit()
    stopped = stop_after(Trainer(tiny_config(*common, out_dir=tmp_path / "split")), 10).fit()
    assert (stopped.step, stopped.stopped_by, stopped.checkpoint.name) == (10, "SIGTERM", "step_00000010")
    Trainer(tiny_config(*common, out_dir=tmp_path / "split"), resume=True).fit()
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert list(split) == list(range(1, 21))
    assert split == straight
    a = load_model(tmp_path / "straight")[0].state_dict()
    b = load_model(tmp_path / "split")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_ramp_up_consumes_the_ramped_sizes(tiny_config):
    cfg = tiny_config("--train.global_batch_size=16", "--train.rampup_start=4", "--train.rampup_increment=4", "--train.rampup_samples=24")
    Trainer(cfg).fit()
    sizes = [r["batch_size"] for r in read_metrics(cfg.train.out_dir) if "loss" in r]
    assert sizes == [4, 4, 8, 12, 16, 16]


def test_resume_refuses_a_different_model(tiny_config, tmp_path):
    Trainer(tiny_config("--train.max_steps=3")).fit()
    with pytest.raises(MtnlgError, match=r"model config differs \(model\.n_layer: checkpoint 2, config 3"):
        Trainer(tiny_config("--model.n_layer=3"), resume=True)


def test_existing_run_needs_resume_and_resume_needs_a_run(tiny_config):
    with pytest.raises(MtnlgError, match="nothing to resume"):
        Trainer(tiny_config(), resume=True)
    Trainer(tiny_config("--train.max_steps=3")).fit()
    with pytest.raises(MtnlgError, match="already holds checkpoints; pass --resume"):
        Trainer(tiny_config())


def test_interrupted_checkpoint_never_becomes_latest(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("--train.max_steps=6", "--train.save_interval=3"))
    real_save = safetensors.torch.save_model

    def dies_on_second_save(model, filename, *args, **kwargs):
        if "step_00000006" in filename:
            real_save(model, filename, *args, **kwargs)
            raise KeyboardInterrupt  # as if the process were killed mid-write
        real_save(model, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_model", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert find_latest(checkpoints).name == "step_00000003"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000003"]
    monkeypatch.undo()
    result = Trainer(tiny_config(), resume=True).fit()
    assert result.step == 6 and find_latest(checkpoints).name == "step_00000006"


def test_sigterm_saves_a_loadable_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mtnlg", "train", "tiny", f"--train.data={tiny_data}", f"--train.out_dir={run}",
        "--train.max_steps=100000", "--train.save_interval=0", "--train.eval_interval=0", "--train.tensorboard=false",
        "--train.progress=false", "--train.micro_batch_size=2", "--train.global_batch_size=2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not losses(run) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert losses(run), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    checkpoint = find_latest(run / "checkpoints")
    model, tokenizer, config = load_model(checkpoint)
    step = int(checkpoint.name.split("_")[1])
    assert step >= 1 and step == max(losses(run))
    assert model(torch.tensor([tokenizer.encode("the model")])).isfinite().all()
