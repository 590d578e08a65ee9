"""Evaluation throughput: `mtnlg eval` against lm-evaluation-harness's `hf` backend, same model, same task.

A random-weight GPT-2 124M-shaped mtnlg checkpoint is exported to Hugging Face format (`mtnlg export hf`)
and both sides score one multiple-choice task in HellaSwag's shape: the first 40 words of a paragraph of
this Python's documentation and four 15-word endings (the next words as written, and shuffled three ways),
4 requests per item. Each side has its model loaded once; a round times one whole evaluation (building the requests,
scoring them, the metrics), and the rounds alternate, so machine noise hits both. Both compute in fp32 and
their per-item log-likelihoods are checked to agree before any time is reported.

    .venv/bin/python benchmarks/eval_throughput.py                 # 100 items, lm-eval at batch size 16
    .venv/bin/python benchmarks/eval_throughput.py --items 200 --hf-batch-size 32 --rounds 3

It prints the CPU first. mtnlg reads each item's context once and its four endings on top of the cached
keys and values, and sends only the positions that predict an ending token through the LM head; lm-eval's
hf backend reads context + ending whole for every request and takes the log-softmax of every position.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

import mtnlg
from mtnlg.checkpoint import save_checkpoint
from mtnlg.config import Config, ModelConfig
from mtnlg.data.corpus import build_default_corpus
from mtnlg.data.prepare import read_documents
from mtnlg.demo import write_word_order_task
from mtnlg.eval.harness import Options, evaluate
from mtnlg.eval.scoring import ModelScorer
from mtnlg.eval.tasks import load_task
from mtnlg.hardware import this_cpu
from mtnlg.interop.hf import export_hf
from mtnlg.model.gpt import GPT
from mtnlg.tokenizer import Tokenizer

LM_EVAL_TASK = """task: endings
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def build(directory: Path, items: int) -> tuple[Path, Path, Path]:
    """The mtnlg checkpoint, its Hugging Face export, and the task file."""
    corpus = build_default_corpus(directory / "corpus.jsonl")
    documents = list(read_documents(corpus))
    tokenizer = Tokenizer.train(documents, 50257)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("gpt2", vocab_size=50257)).eval()  # GPT-2's LM head; the tokenizer uses fewer
    checkpoint = save_checkpoint(directory / "mtnlg", model, Config(model=model.cfg), tokenizer)
    exported = export_hf(checkpoint, directory / "hf")
    task = write_word_order_task(documents, directory / "word_order.jsonl", items, context_words=40, ending_words=15,
                                 max_bytes=1000)
    return checkpoint, exported, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--hf-batch-size", type=int, default=16, help="lm-eval's batch_size (requests per forward)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers.utils import logging

    logging.set_verbosity_error()
    print(this_cpu().describe())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, exported, task_file = build(Path(tmp), args.items)
        (Path(tmp) / "yaml").mkdir()
        (Path(tmp) / "yaml" / "endings.yaml").write_text(LM_EVAL_TASK.format(data=task_file))
        tasks = TaskManager(include_path=str(Path(tmp) / "yaml"), include_defaults=False)
        ours = mtnlg.load(checkpoint, "cpu", dtype="fp32")
        theirs = HFLM(pretrained=str(exported), dtype="float32", device="cpu", batch_size=args.hf_batch_size)
        task = load_task(str(task_file))
        requests = sum(len(d["choices"]) for d in task.docs)
        tokens = sum(len(ours.tokenizer.encode(d["context"] + " " + c)) for d in task.docs for c in d["choices"])
        print(f"GPT-2 124M shape (vocabulary 50257, {ours.tokenizer.vocab_size} used by the tokenizer), fp32, {args.threads} threads, torch "
              f"{torch.__version__}, lm-eval {lm_eval.__version__}; {len(task.docs)} items, {requests} requests, "
              f"{tokens / requests:.0f} tokens per request on average")

        def run_ours() -> list[list[float]]:
            result = evaluate(ModelScorer(ours.model, ours.tokenizer), ours.tokenizer, [task], Options(progress=False))
            return [[ll for ll, _ in s["resps"]] for s in result[0].samples]

        def run_theirs() -> list[list[float]]:
            out = lm_eval.simple_evaluate(model=theirs, tasks=["endings"], task_manager=tasks, log_samples=True,
                                          verbosity="ERROR")
            samples = sorted(out["samples"]["endings"], key=lambda s: s["doc_id"])
            return [[r[0] for r in s["filtered_resps"]] for s in samples]

        times: dict[str, list[float]] = {"mtnlg": [], "lm-eval hf": []}
        with torch.no_grad():
            a, b = run_ours(), run_theirs()  # warm up, and the two must agree
            worst = max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
            print(f"per-request log-likelihoods agree within {worst:.1e}")
            assert worst < 1e-3, worst
            for _ in range(args.rounds):
                for name, run in (("mtnlg", run_ours), ("lm-eval hf", run_theirs)):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    rates = {name: len(task.docs) / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:<11} {rates[name]:6.2f} items/s ({statistics.median(t):.1f} s per evaluation; rounds "
              f"{', '.join(f'{x:.1f}' for x in t)} s)")
    print(f"ratio mtnlg / lm-eval hf: {rates['mtnlg'] / rates['lm-eval hf']:.2f}")
    print(json.dumps({"items_per_s": rates, "items": len(task.docs), "hf_batch_size": args.hf_batch_size}))


if __name__ == "__main__":
    main()
