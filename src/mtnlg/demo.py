"""`mtnlg demo`: the whole path on data every Python already has — corpus, tokenizer, shards, training,
a loss curve, completions and an evaluation — in a few minutes on a laptop CPU, with nothing downloaded."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np

import mtnlg
from mtnlg.config import Config, load_config
from mtnlg.data.corpus import build_default_corpus
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.prepare import prepare, read_documents
from mtnlg.eval.harness import Options, evaluate
from mtnlg.eval.results import format_table
from mtnlg.eval.scoring import ModelScorer
from mtnlg.eval.tasks import load_task
from mtnlg.files import write_jsonl_atomic
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import EOD, Tokenizer
from mtnlg.train.metrics import plot_losses
from mtnlg.train.trainer import Trainer, TrainResult

PROMPTS = ("The list type", "To open a file, use", "An exception is raised when")


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the tokens' own frequencies: the loss of the best context-free model."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class Steps:
    """Numbered progress lines ("[2/5] ..."), so a user sees how far a demo has come."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}", flush=True)


def pretrain(out: Path, overrides: list[str], step: Steps) -> tuple[Config, TrainResult]:
    """The demo model (two steps of `step`): corpus, tokenizer and shards under out/data unless they exist,
    then training to out/run, continued where a previous run stopped (at once when it finished)."""
    data_dir = out / "data"
    config = load_config(
        Path(__file__).parent / "configs" / "demo.toml",
        [f"--train.data={data_dir / 'corpus'}", f"--train.out_dir={out / 'run'}", *overrides],
    )
    prefix = Path(config.train.data)
    if not Path(f"{prefix}_train.idx").is_file():
        start = time.perf_counter()
        corpus = build_default_corpus(data_dir / "corpus.jsonl")
        tokenizer = Tokenizer.train(read_documents(corpus), config.model.vocab_size)
        tokenizer.save(data_dir)
        prepare([corpus], prefix, tokenizer, val_fraction=0.05)
        step(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.1f} MB from this Python's documentation), tokenizer "
             f"and shards ready in {time.perf_counter() - start:.0f}s")
    else:
        step(f"corpus, tokenizer and shards: {data_dir} (already built)")
    trainer = Trainer(config, resume="auto")
    start = f"resuming from step {trainer.step}" if trainer.resumed_from else "from scratch"
    step(f"training the demo model ({start}) -> {config.train.out_dir}")
    result = trainer.fit()
    if result.val_loss is None and not result.stopped_by:  # finished before: nothing trained, so measure it
        result.val_loss = trainer.evaluate()
    return config, result


def run_demo(out: Path, overrides: list[str] | None = None) -> None:
    began = time.perf_counter()
    step = Steps(4)
    config, result = pretrain(out, overrides or [], step)
    prefix = Path(config.train.data)
    data_dir = prefix.parent
    if result.stopped_by:
        print(f"stopped by {result.stopped_by}; run `make demo` again to continue")
        return
    val_tokens = IndexedDataset(f"{prefix}_val").tokens
    entropy = unigram_entropy(val_tokens)
    print(f"final validation loss      {result.val_loss:.3f} nats/token (perplexity {math.exp(result.val_loss):.1f})")
    print(f"unigram entropy of val set {entropy:.3f} nats/token: the model is {entropy - result.val_loss:.2f} nats better")
    print(f"loss curve: {plot_losses(config.train.out_dir)}")
    model = mtnlg.load(config.train.out_dir)
    step("completions (temperature 0.7, top-p 0.9):")
    for prompt, completion in zip(PROMPTS, model.generate(PROMPTS, max_new_tokens=40, temperature=0.7, top_p=0.9, seed=0)):
        print(f"  {prompt!r} -> {completion.text!r}")
    task = write_word_order_task(held_out_documents(f"{prefix}_val", model.tokenizer), data_dir / "word_order.jsonl")
    step(f"evaluation on {task}: the first 8 words of a held-out docstring paragraph, then its next 8 as "
          "written or shuffled three ways; which is the text? (chance 0.25)")
    evaluate_against_random_init(model, task)
    minutes, seconds = divmod(round(time.perf_counter() - began), 60)
    print(f"demo finished in {minutes} min {seconds:02d} s")
    print(f"evaluate it: .venv/bin/mtnlg eval {config.train.out_dir} --tasks {task} --perplexity {prefix}_val")
    print(f"serve it (OpenAI API and a playground at http://127.0.0.1:8000/): .venv/bin/mtnlg serve {config.train.out_dir}")


def held_out_documents(prefix: str, tokenizer: Tokenizer) -> list[str]:
    """The text of a shard's documents (the validation split: never trained on)."""
    shard = IndexedDataset(prefix)
    return [tokenizer.decode(shard[i]).removesuffix(EOD) for i in range(len(shard))]


def write_word_order_task(documents: list[str], path: Path, items: int = 200, context_words: int = 8,
                          ending_words: int = 8, max_bytes: int = 120, seed: int = 0) -> Path:
    """A multiple-choice task over held-out text, BLiMP's idea in HellaSwag's shape: the first words of a
    paragraph, then four versions of the words that follow, as written and shuffled three ways. A model that
    learned the language prefers the text as written; one that did not cannot tell. An item stays under
    `max_bytes` (so under as many byte-level BPE tokens); words are rejoined by single spaces."""
    rng = random.Random(seed)
    rows = []
    for document in documents:
        for paragraph in document.split("\n\n"):
            words = paragraph.split()[: context_words + ending_words]
            context, ending = " ".join(words[:context_words]), words[context_words:]
            if len(ending) < ending_words or len(set(ending)) < 4 or len(f"{context} {' '.join(ending)}".encode()) > max_bytes:
                continue
            shuffles: set[tuple[str, ...]] = set()
            while len(shuffles) < 3:
                shuffled = rng.sample(ending, len(ending))
                if shuffled != ending:
                    shuffles.add(tuple(shuffled))
            choices = [" ".join(s) for s in sorted(shuffles)]
            gold = rng.randrange(4)
            choices.insert(gold, " ".join(ending))
            rows.append({"context": context, "choices": choices, "gold": gold})
    rows = rng.sample(rows, min(items, len(rows)))
    return write_jsonl_atomic(path, rows)


def evaluate_against_random_init(model: mtnlg.LanguageModel, task_path: Path) -> None:
    """The trained model's scores beside those of an untrained one of the same shape (its weights as
    training starts them): what training taught, measured."""
    task = load_task(str(task_path))
    untrained = GPT(model.config.model, seed=model.config.train.seed).eval()
    for name, net in (("trained", model.model), ("random init", untrained)):
        result = evaluate(ModelScorer(net, model.tokenizer), model.tokenizer, [task], Options(progress=False))
        print(f"  {name}:")
        print("\n".join("    " + line for line in format_table(result).splitlines()))
