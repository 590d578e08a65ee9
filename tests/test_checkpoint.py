"""The checkpoint directory: training writes only the sharded state/, every verb reads it, `mtnlg consolidate`
streams it into the model.safetensors that safetensors itself would write, and a full disk is one line."""

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch.distributed.checkpoint import filesystem

import mtnlg
import mtnlg.files
from mtnlg.checkpoint import (
    MODEL_FILE,
    checkpoint_bytes,
    consolidate,
    find_latest,
    load_model,
    save_checkpoint,
    save_training_checkpoint,
)
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig, load_config
from mtnlg.errors import MtnlgError
from mtnlg.model.flops import human
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.optim import build_optimizer
from mtnlg.train.trainer import Trainer
from spawn import spawn


def dcp_checkpoint(path: Path, cfg: ModelConfig, tokenizer: Tokenizer) -> GPT:
    """A training checkpoint (state/ with optimizer state, no model.safetensors) of a model after one step."""
    config = Config(model=cfg)
    model = GPT(cfg)
    optimizer = build_optimizer(model, config.train)
    model(torch.arange(8)[None]).sum().backward()
    optimizer.step()
    save_training_checkpoint(path, [(model, optimizer)], config, tokenizer, {"step": 1}, is_main=True)
    assert not (path / MODEL_FILE).exists()
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])  # tied learned positions; untied with rotary buffers
def test_consolidate_writes_what_save_model_writes(preset, tiny_data, tmp_path):
    model = dcp_checkpoint(tmp_path / "ckpt", ModelConfig.from_name(preset), Tokenizer.load(tiny_data.parent))
    x = torch.arange(10)[None]
    loaded = load_model(tmp_path / "ckpt")[0]  # from state/ alone
    assert torch.equal(loaded(x), model(x))

    path = consolidate(tmp_path / "ckpt")
    safetensors.torch.save_model(model, str(tmp_path / "reference.safetensors"))
    ours, reference = safetensors.safe_open(path, "pt"), safetensors.safe_open(tmp_path / "reference.safetensors", "pt")
    assert sorted(ours.keys()) == sorted(reference.keys())
    assert ours.metadata() == reference.metadata()  # the tied name it left out, as save_model records it
    assert all(torch.equal(ours.get_tensor(k), reference.get_tensor(k)) for k in ours.keys())
    assert torch.equal(load_model(tmp_path / "ckpt")[0](x), model(x))  # now from model.safetensors


# Resident memory from /proc: ru_maxrss would start at pytest's own size, which a child inherits through exec.
# The process baseline is taken after a first consolidation, which loads and sets up what DCP's reader needs
# once (4 MB, more on a fresh clone that compiles its bytecode); writing 5 to clear_refs resets the peak.
CONSOLIDATE_AND_MEASURE = """
import sys
from pathlib import Path
from mtnlg.checkpoint import consolidate

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

consolidate(Path(sys.argv[1]))
Path("/proc/self/clear_refs").write_text("5")
baseline = status("VmRSS")
consolidate(Path(sys.argv[1]))
print(baseline, status("VmHWM"))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_consolidation_holds_one_tensor_at_a_time(tiny_data, tmp_path):
    """A 32 MiB embedding (state/ holds it twice, tied) and 100 MB of block weights: the process grows by about
    twice the largest tensor (DCP reads it into memory of its own, then copies it into ours), never by the model."""
    cfg = ModelConfig(vocab_size=8192, n_layer=2, n_head=8, d_model=1024, max_seq_len=64)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in GPT(cfg).named_parameters()}
    largest = max(s.numel() for s in shapes.values()) * 4
    dcp_checkpoint(tmp_path / "ckpt", cfg, Tokenizer.load(tiny_data.parent))
    total = sum(s.numel() for s in shapes.values()) * 4
    done = subprocess.run([sys.executable, "-c", CONSOLIDATE_AND_MEASURE, str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    baseline, peak = map(int, done.stdout.split())
    growth = peak - baseline
    print(f"largest tensor {largest / 1e6:.1f} MB, model {total / 1e6:.1f} MB, baseline {baseline / 1e6:.1f} MB, "
          f"peak {peak / 1e6:.1f} MB, growth {growth / 1e6:.1f} MB = {growth / largest:.2f} x largest")
    assert total > 4 * largest
    assert growth < 2 * largest + 2**20  # + page rounding and the objects of one DCP call
    assert (tmp_path / "ckpt" / MODEL_FILE).stat().st_size > total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoint_bytes_is_the_size_on_disk(tiny_config, tmp_path):
    cfg = tiny_config("--train.max_steps=2", "--train.save_interval=2", "--train.consolidate=never")
    checkpoint = Trainer(cfg).fit().checkpoint
    for consolidated in (False, True):
        if consolidated:
            consolidate(checkpoint)
        want, got = checkpoint_bytes(cfg.model, consolidated=consolidated), dir_bytes(checkpoint)
        print(f"consolidated={consolidated}: estimated {want:,} bytes, on disk {got:,}")
        assert abs(want - got) < 0.1 * got


def test_train_consolidate_is_a_choice():
    with pytest.raises(MtnlgError, match="train.consolidate is 'sometimes'; choose one of: end, every, never"):
        load_config(None, ["--train.consolidate=sometimes"])


def test_a_run_consolidates_at_its_last_save_by_default(tiny_config, tmp_path):
    Trainer(tiny_config("--train.max_steps=4", "--train.save_interval=2", "--train.keep_last=0")).fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints / "step_00000002" / MODEL_FILE).exists()
    assert (checkpoints / "step_00000004" / MODEL_FILE).is_file()


def test_a_run_without_model_safetensors_resumes_generates_exports_and_consolidates(tiny_config, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    Trainer(tiny_config("--train.max_steps=2", "--train.save_interval=2", "--train.consolidate=never")).fit()
    assert list(run.glob("checkpoints/*/" + MODEL_FILE)) == []
    resumed = Trainer(tiny_config("--train.max_steps=4", "--train.consolidate=never"), resume=True)
    assert resumed.step == 2 and resumed.fit().step == 4
    checkpoint = find_latest(run / "checkpoints")
    assert checkpoint.name == "step_00000004" and not (checkpoint / MODEL_FILE).exists()

    model, tokenizer, _ = load_model(run)
    x = torch.tensor([tokenizer.encode("the model learns")])
    logits = model(x)
    text = mtnlg.load(run, device="cpu", dtype="fp32").generate("the model", max_new_tokens=5, temperature=0)[0].text
    assert text and main(["generate", str(run), "--prompt", "the model", "--max-new-tokens", "5", "--temperature", "0"]) == 0

    assert main(["export", "hf", str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf(x).logits, logits, atol=1e-5, rtol=0)

    capsys.readouterr()
    assert main(["consolidate", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {checkpoint / MODEL_FILE} (")
    state = model.state_dict()
    consolidated = safetensors.torch.load_file(checkpoint / MODEL_FILE)
    assert consolidated.keys() == state.keys() - {"tok_emb.weight"}  # tied: the head's name alone
    assert all(torch.equal(consolidated[k], state[k]) for k in consolidated)
    assert torch.equal(load_model(run)[0](x), logits)


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the kernel fails it."""

    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return 0

    def write(self, data) -> int:
        raise self.error


class FullDiskUnderTorchSave(FullDisk):
    """What torch.save's zip writer (DCP writes each tensor with it) makes of a full disk: a RuntimeError."""

    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def filling_disk_at(step: int, disk: type[FullDisk] = FullDisk):
    """FileSystem.create_stream, through which DCP's writer opens each file of state/, with the files of this
    step's save landing on a full disk."""
    real = filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if f"step_{step:08d}" in str(path) and "w" in mode:
            yield disk()
        else:
            with real(self, path, mode) as stream:
                yield stream

    return create_stream


@pytest.mark.parametrize("disk", [FullDisk, FullDiskUnderTorchSave], ids=["ENOSPC", "torch.save"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint_before(tiny_config, tiny_data, tmp_path,
                                                                               monkeypatch, capsys, disk):
    cfg = tiny_config("--train.max_steps=3", "--train.save_interval=1", "--train.eval_interval=0")
    checkpoints = tmp_path / "run" / "checkpoints"
    monkeypatch.setattr(filesystem.FileSystem, "create_stream", filling_disk_at(2, disk))
    if disk is FullDiskUnderTorchSave:  # the zip writer names no errno: the free space tells
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MtnlgError) as error:
        Trainer(cfg).fit()
    message = str(error.value)
    print(message)
    assert "\n" not in message and str(checkpoints) in message
    assert human(checkpoint_bytes(cfg.model), "B") in message and "--train.out_dir" in message
    assert find_latest(checkpoints).name == "step_00000001" and load_model(checkpoints)[0] is not None
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]

    args = ["train", "tiny", f"--train.data={tiny_data}", f"--train.out_dir={tmp_path / 'cli'}", "--train.max_steps=3",
            "--train.save_interval=1", "--train.eval_interval=0", "--train.progress=false", "--train.tensorboard=false",
            "--train.micro_batch_size=2", "--train.global_batch_size=2"]
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("mtnlg train: error: no space left on the disk of ") and err.count("\n") == 1, err
    assert not list((tmp_path / "cli" / "checkpoints").glob("*.tmp"))


def test_consolidate_refuses_a_checkpoint_without_state(tiny_data, tmp_path):
    config = Config(model=ModelConfig.from_name("tiny"))
    save_checkpoint(tmp_path / "ckpt", GPT(config.model), config, Tokenizer.load(tiny_data.parent))
    with pytest.raises(MtnlgError, match="has no state/ to consolidate; its weights are already in model.safetensors"):
        consolidate(tmp_path / "ckpt")


def test_state_that_is_not_config_json_s_model_is_one_line(tiny_data, tmp_path):
    dcp_checkpoint(tmp_path / "ckpt", ModelConfig.from_name("tiny"), Tokenizer.load(tiny_data.parent))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["n_layer"] = 3
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MtnlgError, match=r"ckpt/state does not hold this config.json's model \(.*blocks.2.*\); the checkpoint is"):
        load_model(tmp_path / "ckpt")


def test_a_full_disk_while_consolidating_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "ckpt"
    dcp_checkpoint(checkpoint, ModelConfig.from_name("tiny"), Tokenizer.load(tiny_data.parent))

    def open_on_a_full_disk(path, mode):
        Path(path).touch()
        return FullDisk()

    monkeypatch.setattr(mtnlg.files, "open", open_on_a_full_disk, raising=False)
    assert main(["consolidate", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mtnlg consolidate: error: no space left on the disk of {checkpoint} for model.safetensors")
    assert err.count("\n") == 1 and not list(checkpoint.glob("model.safetensors*"))


def _train_with_rank_1_on_a_full_disk(rank: int, config, out: str) -> None:
    if rank == 1:
        filesystem.FileSystem.create_stream = filling_disk_at(2)
    try:
        Trainer(config).fit()
    except MtnlgError as e:
        (Path(out) / f"rank{rank}").write_text(str(e))


@pytest.mark.slow
def test_a_full_disk_on_one_rank_is_the_same_line_on_every_rank(tiny_config, tmp_path):
    """DCP gathers every rank's failure, so the rank that met the full disk and those that did not all stop with
    the same error; rank 0 removes the one temporary folder."""
    config = tiny_config("--train.max_steps=3", "--train.save_interval=1", "--train.eval_interval=0",
                         "--train.micro_batch_size=2", "--train.global_batch_size=4", "--parallel.dp_shard=2")
    spawn(_train_with_rank_1_on_a_full_disk, 2, config, str(tmp_path))
    messages = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1] and messages[0].startswith("no space left on the disk of ")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]


def _score_split_in_two(rank: int, checkpoint: str, out: str) -> None:
    torch.save(mtnlg.load(checkpoint, "cpu", tp=2, dtype="fp32").score(["the model learns"])[0].logprobs, f"{out}.{rank}")


@pytest.mark.slow
def test_tensor_parallel_inference_reads_state_alone(tiny_data, tmp_path):
    dcp_checkpoint(tmp_path / "ckpt", ModelConfig.from_name("llama-tiny"), Tokenizer.load(tiny_data.parent))
    spawn(_score_split_in_two, 2, str(tmp_path / "ckpt"), str(tmp_path / "scores"))
    want = mtnlg.load(tmp_path / "ckpt", "cpu", dtype="fp32").score(["the model learns"])[0].logprobs
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(torch.load(f"{tmp_path / 'scores'}.{rank}")), torch.tensor(want))
