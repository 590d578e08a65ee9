"""`mtnlg demo`: the whole path on data every Python already has — corpus, tokenizer, shards, training,
a loss curve, and completions — in a few minutes on a laptop CPU, with nothing downloaded."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

import mtnlg
from mtnlg.config import load_config
from mtnlg.data.corpus import build_default_corpus
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.prepare import prepare, read_documents
from mtnlg.tokenizer import Tokenizer
from mtnlg.train.metrics import plot_losses
from mtnlg.train.trainer import Trainer

PROMPTS = ("The list type", "To open a file, use", "An exception is raised when")


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the tokens' own frequencies: the loss of the best context-free model."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_demo(out: Path, overrides: list[str] | None = None) -> None:
    began = time.perf_counter()
    data_dir = out / "data"
    config = load_config(
        Path(__file__).parent / "configs" / "demo.toml",
        [f"--train.data={data_dir / 'corpus'}", f"--train.out_dir={out / 'run'}", *(overrides or [])],
    )
    prefix = Path(config.train.data)
    if not Path(f"{prefix}_train.idx").is_file():
        start = time.perf_counter()
        corpus = build_default_corpus(data_dir / "corpus.jsonl")
        print(f"[1/4] corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB from this Python's documentation)")
        tokenizer = Tokenizer.train(read_documents(corpus), config.model.vocab_size)
        tokenizer.save(data_dir)
        prepare([corpus], prefix, tokenizer, val_fraction=0.05)
        print(f"[2/4] tokenizer and shards ready in {time.perf_counter() - start:.0f}s")
    trainer = Trainer(config, resume="auto")
    start = f"resuming from step {trainer.step}" if trainer.resumed_from else "from scratch"
    print(f"[3/4] training the demo model ({start}) -> {config.train.out_dir}")
    result = trainer.fit()
    if result.stopped_by:
        print(f"stopped by {result.stopped_by}; run `make demo` again to continue")
        return
    val_tokens = IndexedDataset(f"{prefix}_val").tokens
    entropy = unigram_entropy(val_tokens)
    print(f"final validation loss      {result.val_loss:.3f} nats/token (perplexity {math.exp(result.val_loss):.1f})")
    print(f"unigram entropy of val set {entropy:.3f} nats/token: the model is {entropy - result.val_loss:.2f} nats better")
    print(f"loss curve: {plot_losses(config.train.out_dir)}")
    model = mtnlg.load(config.train.out_dir)
    print("[4/4] completions (temperature 0.7, top-p 0.9):")
    for prompt, completion in zip(PROMPTS, model.generate(PROMPTS, max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0)):
        print(f"  {prompt!r} -> {completion.text!r}")
    minutes, seconds = divmod(round(time.perf_counter() - began), 60)
    print(f"demo finished in {minutes} min {seconds:02d} s")
    print(f"serve it (OpenAI API and a playground at http://127.0.0.1:8000/): .venv/bin/mtnlg serve {config.train.out_dir}")
