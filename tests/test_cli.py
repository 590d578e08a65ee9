"""Every verb end to end through `mtnlg`, and every bad input answered with one line and a non-zero exit."""

import json
import shutil
import subprocess
import sys

import pytest

from mtnlg.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, pattern, *args):
    code, _, err = run(capsys, *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mtnlg {args[0]}: error: ")
    assert pattern in lines[0], lines[0]


def test_prepare_train_generate_info(capsys, tmp_path, corpus_jsonl):
    code, out, _ = run(capsys, "prepare", corpus_jsonl, "--output", tmp_path / "data" / "c", "--vocab-size", "300", "--workers", "2")
    assert code == 0 and "trained a 300-token byte-level BPE" in out and "c_train" in out
    code, out, _ = run(
        capsys, "train", "tiny", f"--train.data={tmp_path / 'data' / 'c'}", "--train.out_dir", tmp_path / "run",
        "--train.max_steps=4", "--train.tensorboard=false", "--train.progress=false", "--train.eval_interval=2",
    )
    assert code == 0 and "done: step 4, validation loss" in out
    code, out, _ = run(capsys, "generate", tmp_path / "run", "--prompt", "The model", "--max-new-tokens", "5", "--seed", "1")
    assert code == 0 and out.startswith("The model")
    code, out, _ = run(capsys, "info", "--model", tmp_path / "run")
    assert code == 0 and "parameters     136,960" in out
    code, out, _ = run(capsys, "plot", tmp_path / "run")
    assert code == 0 and (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_info_mt_nlg_530b(capsys):
    code, out, _ = run(capsys, "info", "--model", "mt-nlg-530b")
    assert code == 0
    assert "parameters     529,600,819,200 (529.60G" in out
    assert "18 bytes/parameter = 9.53TB" in out
    assert "decode reads   2.12TB fp32, 1.06TB bf16, 529.53GB int8" in out


def test_bad_inputs_get_one_line(capsys, tmp_path, tiny_data):
    assert_user_error(capsys, "no such file", "prepare", tmp_path / "missing.txt", "--output", tmp_path / "x")
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(capsys, "no text found", "prepare", tmp_path / "empty.txt", "--output", tmp_path / "x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    assert_user_error(capsys, "bad.jsonl:3", "prepare", bad, "--output", tmp_path / "x", "--tokenizer", tiny_data.parent)
    assert not list(tmp_path.glob("x*")), "a failed prepare left files behind"
    assert_user_error(capsys, "unknown model preset 'gpt5'", "info", "--model", "gpt5")
    assert_user_error(capsys, "no such config file", "train", tmp_path / "nope.toml")
    assert_user_error(capsys, "did you mean train.max_steps", "train", "tiny", "--train.max_step=3")
    assert_user_error(capsys, "no such checkpoint or run directory", "generate", tmp_path / "nowhere", "--prompt", "hi")


def test_corrupt_data_and_checkpoints(capsys, tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data.parent, data)
    bin_path = data / "corpus_train.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    train = ("train", "tiny", f"--train.data={data / 'corpus'}", f"--train.out_dir={tmp_path / 'run'}")
    assert_user_error(capsys, "corpus_train.bin", *train)
    shutil.copy(tiny_data.parent / "corpus_train.bin", bin_path)
    assert run(capsys, *train, "--train.max_steps=2", "--train.tensorboard=false", "--train.progress=false")[0] == 0
    assert_user_error(capsys, "the prompt has", "generate", tmp_path / "run", "--prompt", "the model " * 80)
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(capsys, "the checkpoint is corrupt", "generate", tmp_path / "run", "--prompt", "hi")
    config = json.loads((checkpoint / "config.json").read_text())
    assert_user_error(capsys, "the config differs (model.n_layer: checkpoint 2, config 3)", *train, "--resume", "--model.n_layer=3")
    assert config["model"]["n_layer"] == 2


def test_a_real_process_exits_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtnlg", "prepare", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


@pytest.mark.parametrize("value", ["0", "-2"])
def test_generate_rejects_bad_sampling(capsys, value, tmp_path):
    assert_user_error(capsys, "top_p", "generate", tmp_path, "--prompt", "x", "--top-p", value)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "tiny", f"--train.data={tiny_data}", f"--train.out_dir={run_dir}", "--train.max_steps=3",
                 "--train.tensorboard=false", "--train.progress=false"]) == 0
    return run_dir


def test_generate_prompts_file_json_and_beams(capsys, tmp_path, tiny_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"The model"\n{"prompt": "Loss"}\n')
    code, out, _ = run(capsys, "generate", tiny_run, "--prompts-file", prompts, "--json", "--n", "2", "--seed", "1",
                       "--max-new-tokens", "4", "--logprobs", "1", "--ignore-eos", "--batch-size", "2")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["index"], r["prompt"]) for r in rows] == [(0, "The model")] * 2 + [(1, "Loss")] * 2
    assert all(len(r["token_ids"]) == 4 == len(r["logprobs"]) and r["finish_reason"] == "length" for r in rows)
    code, out, _ = run(capsys, "generate", tiny_run, "--prompt", "The", "--num-beams", "3", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("--- prompt 0")
    prompts.write_text("{broken\n")
    assert_user_error(capsys, "prompts.jsonl:1: invalid JSON", "generate", tiny_run, "--prompts-file", prompts)
    assert_user_error(capsys, "nothing to generate from", "generate", tiny_run)
    assert_user_error(capsys, "batch size 0 is not positive", "generate", tiny_run, "--prompt", "a", "--prompt", "b",
                      "--batch-size", "0")


def test_chat_streams_replies_until_eof(tiny_run):
    proc = subprocess.run(
        [sys.executable, "-m", "mtnlg", "chat", str(tiny_run), "--max-new-tokens", "5", "--seed", "0"],
        input="hello there\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "User: Assistant:" in proc.stdout and proc.stdout.count("User:") == 2


def test_generate_dtype_follows_the_cpu(capsys, tiny_run, cap_cpu):
    """--dtype auto generates on every CPU; --dtype bf16 where the CPU lacks bf16 products is one line naming
    the missing feature."""
    for forced in (False, True):  # this CPU's own answer, then the AVX2-only one
        if forced:
            cap_cpu("AVX2")
        code, out, _ = run(capsys, "generate", tiny_run, "--prompt", "hi", "--max-new-tokens", "3", "--dtype", "auto")
        assert code == 0 and out.startswith("hi")
    assert_user_error(capsys, "bf16 weights need bf16 instructions (AVX512_BF16", "generate", tiny_run, "--prompt", "hi",
                      "--dtype", "bf16")


@pytest.mark.parametrize("args", [
    ["--help"],
    ["plan", "--model", "mt-nlg-530b", "--gpus", "4480", "--gpu", "a100-80g", "--global-batch", "1920", "--seq", "2048"],
    ["info", "--model", "mt-nlg-530b"],
])
def test_help_plan_and_info_run_without_torch(args):
    """Reading the help and planning a cluster need no torch: they answer at once, on any laptop."""
    code = f"""
import sys
from mtnlg.cli import main
try:
    main({args!r})
except SystemExit as e:  # --help
    assert e.code == 0, e.code
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout, result.stderr
