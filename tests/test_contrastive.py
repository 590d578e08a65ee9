"""Contrastive fine-tuning of an embedder: a packed pair pools exactly as its two texts embed alone, the
InfoNCE loss, `mtnlg finetune` on pairs making an embedder that finds its passages better than its base did,
and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from test_cli import assert_user_error

import mtnlg
from mtnlg.cli import main
from mtnlg.config import ModelConfig
from mtnlg.data.batch import Batch
from mtnlg.finetune.contrastive import Contrastive, pair_rows, pooled
from mtnlg.inference.embed import embed
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.metrics import read_metrics

def pairs() -> list[dict]:
    """A word, and a passage of other words that holds it twice: what a passage is about is in its words."""
    rng = np.random.default_rng(0)
    topics, filler = WORDS[4:28], WORDS[:4] + WORDS[28:]
    out = []
    for topic in topics:
        words = [str(w) for w in rng.choice(filler, 8)] + [topic] * 2
        rng.shuffle(words)
        out.append({"query": topic, "passage": " ".join(words) + "."})
    return out


def test_a_packed_pair_pools_as_each_text_embeds_alone(tiny_data):
    tokenizer = Tokenizer.load(tiny_data.parent)
    model = GPT(ModelConfig.from_name("tiny"), seed=1).eval()
    records = [(f"x:{i}", p) for i, p in enumerate(pairs()[:6])]
    batch = Batch.collate(pair_rows(records, tokenizer, 64))
    with torch.no_grad():
        hidden = model(batch.inputs, hidden=True, **batch.model_inputs())
    for text, key in enumerate(("query", "passage")):
        alone = embed(model, tokenizer.encode_batch([r[key] for _, r in records]), "mean")
        torch.testing.assert_close(pooled(hidden, batch.positions, text), torch.from_numpy(alone), atol=1e-5, rtol=0)

    queries, passages = pooled(hidden, batch.positions, 0), pooled(hidden, batch.positions, 1)
    expected = F.cross_entropy(queries @ passages.T / 0.1, torch.arange(6), reduction="sum") / 3
    assert Contrastive(0.1).loss(hidden, batch, 3) == pytest.approx(expected.item(), rel=1e-5)
    assert Contrastive(0.1).count(batch) == 6

    long = pair_rows([("x:1", {"query": "model " * 50, "passage": "layer " * 50})], tokenizer, 16)[0]
    assert long.positions.tolist() == [*range(8), *range(8), 0]  # query cut to half, passage to the rest


def recall_at_1(checkpoint, examples: list[dict]) -> float:
    lm = mtnlg.load(checkpoint, "cpu", dtype="fp32")
    queries = embed(lm.model, lm.tokenizer.encode_batch([e["query"] for e in examples]))
    passages = embed(lm.model, lm.tokenizer.encode_batch([e["passage"] for e in examples]))
    return float(np.mean((queries @ passages.T).argmax(1) == np.arange(len(examples))))


def test_finetune_on_pairs_makes_a_better_embedder(tiny_bases, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs()))
    base = tiny_bases()
    code = main(["finetune", str(base), "--data", str(data), "--train.out_dir", str(tmp_path / "run"),
                 "--train.max_steps", "40", "--train.lr", "3e-3", "--train.warmup_steps", "3",
                 "--train.global_batch_size", "16", "--train.micro_batch_size", "8", "--train.eval_interval", "0",
                 "--finetune.val_fraction", "0"])
    assert code == 0
    assert "fine-tuning on 24 examples (0 held out" in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    before, after = recall_at_1(base, pairs()), recall_at_1(tmp_path / "run", pairs())
    assert after >= 0.9 and after > before + 0.5, (before, after)


def test_pair_mistakes_are_one_line_errors(tiny_bases, tmp_path, capsys):
    base = tiny_bases()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(pairs()[0]) + "\n" + json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"query": " ", "passage": "text"}) + "\n" + json.dumps(pairs()[0]) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(p) + "\n" for p in pairs()))
    out = ("--train.out_dir", tmp_path / "run")
    assert_user_error(capsys, "mixed.jsonl:2: contrastive pairs", "finetune", base, "--data", mixed, *out)
    assert_user_error(capsys, 'empty.jsonl:1: "query" and "passage"', "finetune", base, "--data", empty, *out)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "the model", "continuation": " learns"}) + "\n")
    assert_user_error(capsys, "eval.tasks score a language model", "finetune", base, "--data", good, *out,
                      "--eval.tasks", task)
    assert_user_error(capsys, "need train.micro_batch_size 2 or more", "finetune", base, "--data", good, *out,
                      "--train.micro_batch_size", "1", "--finetune.val_fraction", "0")
    assert_user_error(capsys, "val_fraction holds out 1, train.micro_batch_size is 8", "finetune", base, "--data", good,
                      *out, "--train.micro_batch_size", "8", "--train.global_batch_size", "8")
    assert_user_error(capsys, "finetune.temperature must be > 0", "finetune", base, "--data", good, *out,
                      "--finetune.temperature", "0")
    assert not (tmp_path / "run").exists()
