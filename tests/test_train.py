import signal
import subprocess
import sys
import time

import pytest
import torch

from mtnlg.checkpoint import find_latest, load_model
from mtnlg.errors import MtnlgError
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
    with pytest.raises(MtnlgError, match=r"the config differs \(model\.n_layer: checkpoint 2, config 3"):
        Trainer(tiny_config("--model.n_layer=3"), resume=True)


def test_existing_run_needs_resume_and_resume_needs_a_run(tiny_config):
    with pytest.raises(MtnlgError, match="nothing to resume"):
        Trainer(tiny_config(), resume=True)
    Trainer(tiny_config("--train.max_steps=3")).fit()
    with pytest.raises(MtnlgError, match="already holds checkpoints; pass --resume"):
        Trainer(tiny_config())


def test_interrupted_checkpoint_never_becomes_latest(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("--train.max_steps=6", "--train.save_interval=3"))
    real_save = torch.save

    def dies_on_second_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if "step_00000006" in getattr(f, "name", ""):  # trainer_state.pt: state/ is written, the folder not renamed
            raise KeyboardInterrupt  # as if the process were killed mid-write

    monkeypatch.setattr(torch, "save", dies_on_second_save)
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


# Runs `mtnlg train` as the command line would, after arranging for the process to SIGKILL itself at one point:
# the last thing it does, so what it leaves behind is what a preempted job leaves.
KILLED_AT = {
    "step": """
from mtnlg.train.trainer import Trainer
step = Trainer.train_step
def train_step(self):
    if self.step == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self)
Trainer.train_step = train_step
""",
    "save": """
from mtnlg import checkpoint
describe = checkpoint._write_description
def describe_then_die(directory, config, tokenizer):
    describe(directory, config, tokenizer)  # state/ and config.json are written, the folder not yet renamed
    if directory.name.startswith("step_{at:08d}"):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_description = describe_then_die
""",
}


def mtnlg_train(args, kill=None, at=0):
    hook = KILLED_AT[kill].format(at=at) if kill else ""
    script = f"import os, signal, sys\n{hook}\nfrom mtnlg.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, "train", *args], capture_output=True, text=True, timeout=300)


def test_resume_auto_survives_sigkill_before_the_first_checkpoint_and_during_a_save(tiny_data, tmp_path):
    """A preempted job reruns the same command with --resume auto: killed before its first checkpoint it starts
    over, killed while saving it continues from the checkpoint before, and it ends with the weights of a run
    that was never interrupted, bit for bit."""
    def command(run):
        return ["tiny", f"--train.data={tiny_data}", f"--train.out_dir={run}", "--train.max_steps=12",
                "--train.save_interval=4", "--train.eval_interval=0", "--train.tensorboard=false",
                "--train.progress=false", "--train.micro_batch_size=2", "--train.global_batch_size=4",
                "--model.dropout=0.1", "--resume", "auto"]

    straight = mtnlg_train(command(tmp_path / "straight"))
    assert straight.returncode == 0 and straight.stdout.startswith("starting"), straight.stderr
    run, checkpoints = tmp_path / "preempted", tmp_path / "preempted" / "checkpoints"

    killed = mtnlg_train(command(run), kill="step", at=2)
    assert killed.returncode == -signal.SIGKILL and find_latest(checkpoints) is None
    killed = mtnlg_train(command(run), kill="save", at=8)
    assert killed.returncode == -signal.SIGKILL and killed.stdout.startswith(f"starting {run} from scratch")
    assert find_latest(checkpoints).name == "step_00000004" and (checkpoints / "step_00000008.tmp").is_dir()

    rerun = mtnlg_train(command(run))
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.splitlines()[0].startswith(f"resuming {run} from step 4")
    assert find_latest(checkpoints).name == "step_00000012" and not list(checkpoints.glob("*.tmp"))
    assert losses(run) == losses(tmp_path / "straight") and list(losses(run)) == list(range(1, 13))
    a = load_model(tmp_path / "straight")[0].state_dict()
    b = load_model(run)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_starts_by_removing_leftovers_of_a_killed_save(tiny_config, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000003.tmp" / "state").mkdir(parents=True)
    (checkpoints / "latest.tmp").write_text("step_00000003\n")
    trainer = Trainer(tiny_config(), resume="auto")
    assert trainer.resumed_from is None and list(checkpoints.iterdir()) == []


def test_eval_tasks_during_training_equal_mtnlg_eval_of_the_checkpoint(tiny_config, tiny_tasks, tmp_path, capsys):
    """[eval] tasks are scored every eval_interval, logged beside the validation loss, with the numbers that
    `mtnlg eval` gives for the checkpoint of that step."""
    import json

    from mtnlg.cli import main

    cfg = tiny_config("--train.max_steps=4", "--train.eval_interval=2", "--train.save_interval=2",
                      f"--eval.tasks={','.join(tiny_tasks)}", "--eval.limit=6")
    Trainer(cfg).fit()
    records = [r for r in read_metrics(cfg.train.out_dir) if "choices/acc" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert {"choices/acc_norm", "documents/loss", "documents/bits_per_byte"} <= set(records[-1])
    assert not any(k.endswith("_stderr") for k in records[-1])
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    out = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--tasks", *tiny_tasks, "--limit", "6", "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for key, value in records[-1].items():
        if "/" in key:
            task, metric = key.split("/")
            assert value == pytest.approx(results[task][f"{metric},none"], rel=1e-5), key


def test_eval_task_mistakes_are_found_before_training(tiny_config, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"context": "Q: 1 + 1?", "answers": ["2"]}\n')
    with pytest.raises(MtnlgError, match="eval.tasks: qa generates text, which training does not run"):
        Trainer(tiny_config(f"--eval.tasks={qa}"))
    qa.write_text('{"context": "' + "the model " * 40 + '", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(MtnlgError, match="qa.jsonl:1: the request is .* the model's context is 64"):
        Trainer(tiny_config(f"--eval.tasks={qa}"))  # checked before the first step, not at the first evaluation
    with pytest.raises(MtnlgError, match="train.eval_interval steps, which is 0"):
        Trainer(tiny_config(f"--eval.tasks={qa}", "--train.eval_interval=0"))


@pytest.mark.slow
def test_compiled_training_with_activation_checkpointing_matches_eager(tiny_config):
    """torch.compile traces the recompute that the layout wraps around each block: same losses as eager
    without it."""
    steps = ("--train.max_steps=3", "--train.eval_interval=0", "--train.save_interval=0")
    eager = Trainer(tiny_config(*steps))
    compiled = Trainer(tiny_config(*steps, "--train.compile=true", "--parallel.activation_checkpointing=selective",
                                   out_dir=eager.run_dir.parent / "compiled"))
    for _ in range(3):
        assert compiled.train_step()[0] == pytest.approx(eager.train_step()[0], rel=1e-5)
