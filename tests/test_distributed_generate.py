"""Generation under tensor parallelism: 2 gloo processes produce exactly the single-process tokens.

A tiny checkpoint (random weights, a trained tokenizer) is generated from in one process here, and
in two processes that each hold half of every layer; both must choose the same tokens, greedy and
sampled, for a batch of prompts of mixed lengths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtnlg
from mtnlg.checkpoint import save_checkpoint
from mtnlg.cli import main
from mtnlg.config import Config, ModelConfig
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer
from spawn import spawn

PROMPTS = ["The model", "Training runs on one machine or many while the loss", "A"]
GREEDY = dict(temperature=0, max_new_tokens=12, ignore_eos=True)
SAMPLED = dict(temperature=1.0, top_p=0.9, max_new_tokens=12, ignore_eos=True, seed=3, n=2)


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """"tiny" (learned positions, tied embeddings, biases) and "llama-tiny" (rotary, GQA, SwiGLU)."""
    tokenizer = Tokenizer.load(tiny_data.parent)
    out = tmp_path_factory.mktemp("tp_checkpoints")
    paths = {}
    for name in ("tiny", "llama-tiny"):
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_name(name))
        paths[name] = save_checkpoint(out / name, model, Config(model=model.cfg), tokenizer)
    return paths


def _run(lm: mtnlg.LanguageModel) -> dict:
    """Everything compared between layouts: greedy, seeded, beam search, streaming, scoring."""
    return {
        "greedy": [c.token_ids for c in lm.generate(PROMPTS, **GREEDY)],
        "sampled": [c.token_ids for c in lm.generate(PROMPTS, **SAMPLED)],
        "beams": [c.token_ids for c in lm.generate(PROMPTS[0], num_beams=2, n=2, max_new_tokens=6, ignore_eos=True)],
        "streamed": "".join(lm.stream(PROMPTS[1], **GREEDY)),
        "scores": [s.logprobs for s in lm.score(PROMPTS)],
    }


def _worker(rank: int, checkpoint: str, out: str) -> None:
    lm = mtnlg.load(checkpoint, "cpu", tp=2, dtype="fp32")
    result = _run(lm)
    torch.manual_seed(rank)  # the global generators differ: an unseeded draw must still agree
    result["unseeded"] = [c.token_ids for c in lm.generate(PROMPTS, **{**SAMPLED, "seed": None})]
    torch.save(result, f"{out}.{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_tensor_parallel_generation_matches_one_process(checkpoints, tmp_path, name):
    out = str(tmp_path / "result")
    spawn(_worker, 2, str(checkpoints[name]), out)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert ranks[0] == ranks[1]  # every process chose the same tokens, unseeded sampling included
    got, want = ranks[0], _run(mtnlg.load(checkpoints[name], "cpu", dtype="fp32"))
    assert len({len(ids) for ids in got["greedy"]}) == 1 and len(got["sampled"]) == 2 * len(PROMPTS)
    for key in ("greedy", "sampled", "beams", "streamed"):
        assert got[key] == want[key], key
    for a, b in zip(got["scores"], want["scores"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_generate_under_torchrun_prints_once(checkpoints, capsys):
    # --num-completions: torchrun would claim --n for itself
    args = ["generate", str(checkpoints["llama-tiny"]), "--prompt", "hello", "--max-new-tokens", "20", "--seed", "1",
            "--num-completions", "2", "--dtype", "fp32"]  # auto is bf16 alone on a CPU with bf16, fp32 under tp
    assert main(args) == 0
    alone = capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mtnlg", *args, "--tp", "2"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == alone and alone.count("--- prompt 0") == 2


def test_tensor_parallel_layout_errors(checkpoints, monkeypatch, capsys):
    """Checked before any process group or weights: one line each, exit status 1."""
    path = str(checkpoints["llama-tiny"])

    def error(*extra: str) -> str:
        assert main(["generate", path, "--prompt", "hello", *extra]) == 1
        return capsys.readouterr().err

    assert "tp 2 splits the model over 2 processes, but 1 is running; launch them with torchrun" in error("--tp", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "model.n_kv_head (2) is not divisible by parallel.tp (4)" in error()
    assert "4 processes were started but --tp is 1; pass --tp 4" in error("--tp", "1")
    assert error("--tp", "2").count("\n") == 1
