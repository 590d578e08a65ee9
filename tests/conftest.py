"""Shared fixtures: a small synthetic English corpus, its tokenizer and shards, and a tiny training config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mtnlg.config import load_config

WORDS = (
    "the a model learns to predict next token from text data with attention over layers and heads "
    "training runs on one machine or many while loss falls slowly as steps pass through batches of samples"
).split()


def synthetic_documents(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "." for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture
def cap_cpu(monkeypatch):
    """Force the CPU-capability answer as ONEDNN_MAX_CPU_ISA does: after cap_cpu("AVX2"), mtnlg.hardware
    answers as an AVX2-only CPU would, and every fast path takes its fallback."""
    from mtnlg.hardware import this_cpu

    def cap(isa: str) -> None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        this_cpu.cache_clear()

    yield cap
    monkeypatch.undo()
    this_cpu.cache_clear()


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents()))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_jsonl) -> Path:
    """Shard prefix (PREFIX_train / PREFIX_val) of the synthetic corpus, with tokenizer.json beside it."""
    from mtnlg.data.prepare import prepare, read_documents
    from mtnlg.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("data")
    tokenizer = Tokenizer.train(read_documents(corpus_jsonl), 512)
    tokenizer.save(out)
    prepare([corpus_jsonl], out / "corpus", tokenizer, val_fraction=0.1, progress=False)
    return out / "corpus"


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A tiny model and a short run writing into this test's temp dir; pass overrides to change it."""

    def make(*overrides: str, out_dir: Path | None = None):
        base = [
            "--model.preset=tiny",
            f"--train.data={tiny_data}",
            f"--train.out_dir={out_dir or tmp_path / 'run'}",
            "--train.micro_batch_size=4",
            "--train.global_batch_size=8",
            "--train.max_steps=6",
            "--train.warmup_steps=2",
            "--train.eval_interval=3",
            "--train.eval_batches=2",
            "--train.save_interval=3",
            "--train.tensorboard=false",
            "--train.progress=false",
        ]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> list[str]:
    """Two `mtnlg eval` task files over the synthetic corpus's words: multiple choice (choices of 1, 3, 5 and 7
    words, so their scores are far apart) and documents to score whole (rolling windows)."""
    rng = random.Random(3)
    out = tmp_path_factory.mktemp("tasks")
    mc = [{"context": " ".join(rng.choice(WORDS) for _ in range(6)).capitalize(),
           "choices": [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (1, 3, 5, 7)], "gold": i % 4}
          for i in range(10)]
    (out / "choices.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (out / "documents.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(3, seed=5)))
    return [str(out / "choices.jsonl"), str(out / "documents.jsonl")]


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory, tiny_data):
    """base(preset) -> an mtnlg checkpoint of that preset with random weights and the synthetic corpus's
    tokenizer: what fine-tuning tests start from."""
    from mtnlg.checkpoint import save_checkpoint
    from mtnlg.config import Config, ModelConfig
    from mtnlg.model.gpt import GPT
    from mtnlg.tokenizer import Tokenizer

    made: dict[str, Path] = {}

    def base(preset: str = "tiny") -> Path:
        if preset not in made:
            cfg = ModelConfig.from_name(preset)
            made[preset] = save_checkpoint(tmp_path_factory.mktemp(f"base-{preset}"), GPT(cfg, seed=7), Config(model=cfg),
                                           Tokenizer.load(tiny_data.parent))
        return made[preset]

    return base


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """Prompt/completion examples of varied lengths over the synthetic corpus's words (JSONL)."""
    rng = random.Random(11)
    path = tmp_path_factory.mktemp("sft") / "examples.jsonl"
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))).capitalize() + ":",
             "completion": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10))) + "."} for _ in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
