"""Run tasks on a model: build each document's requests (lm-eval's prompts and boundary rule), score all of
them in one batched pass, and turn the answers into per-document and aggregate metrics.

Under torchrun with data parallelism each data-parallel rank scores every `ranks[1]`-th document and the
answers are gathered, so every process ends with the numbers one process would have computed.
"""

from __future__ import annotations

import math
import re
import string
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from mtnlg.defaults import MAX_GEN_TOKENS
from mtnlg.errors import MtnlgError
from mtnlg.eval.scoring import Pair, Progress, Scorer, encode_pair, fits, rolling_windows
from mtnlg.eval.tasks import Task
from mtnlg.tokenizer import Tokenizer

# How each metric of a task type is aggregated over documents (lm-eval's names); "mean" ones get a standard
# error. Rolling metrics are weighted: the whole task's nats over its tokens, words or bytes (ROLLING_UNIT).
# chrF and BLEU are sacrebleu's corpus scores (0-100) over the whole task, as lm-eval aggregates them.
METRICS = {
    "multiple_choice": {"acc": "mean", "acc_norm": "mean"},
    "loglikelihood": {"acc": "mean", "perplexity": "perplexity"},
    "loglikelihood_rolling": {"loss": "weighted_mean", "perplexity": "weighted_perplexity",
                              "word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                              "bits_per_byte": "bits_per_byte"},
    "generate_until": {"exact_match": "mean", "f1": "mean", "rouge_l": "mean", "chrf": "chrf", "bleu": "bleu"},
}
ROLLING_UNIT = {"loss": "tokens", "perplexity": "tokens", "word_perplexity": "words", "byte_perplexity": "bytes",
                "bits_per_byte": "bytes"}
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "exact_match": True, "f1": True, "rouge_l": True, "chrf": True,
                    "bleu": True}


@dataclass
class Options:
    num_fewshot: int = 0
    seed: int = 1234  # of the few-shot draws
    limit: int | None = None  # the first N documents of each task
    truncate: bool = False  # drop context from the left when a request is longer than the model's context
    stride: int | None = None  # of rolling windows; None: the model's context (disjoint windows, as lm-eval)
    max_gen_tokens: int = MAX_GEN_TOKENS
    progress: bool = True


@dataclass
class TaskResult:
    task: Task
    metrics: dict[str, float]  # aggregate value of each metric, with "<metric>_stderr" for means
    samples: list[dict]  # per document: its prompts, requests, answers and metrics
    num_fewshot: int


@dataclass
class Planned:
    """One document's prompts and what to ask the model: token pairs to score, or (requests None) a generation."""

    task: int  # position in the task list
    index: int
    prompts: list[str]
    requests: list[Pair] | None


def evaluate(scorer: Scorer, tokenizer: Tokenizer, tasks: Sequence[Task], options: Options = Options(),
             ranks: tuple[int, int] = (0, 1)) -> list[TaskResult]:
    """Score `tasks`; this process reads documents rank, rank + count, ... of `ranks` = (rank, count)."""
    return run(scorer, tokenizer, tasks, plan(tasks, tokenizer, scorer.max_len, options), options, ranks)


def plan(tasks: Sequence[Task], tokenizer: Tokenizer, max_len: int, options: Options) -> list[Planned]:
    """Every document's prompts and requests, checked against the model's context. Every rank plans every
    document, so a bad one stops all ranks with the same message before any of them scores."""
    names = [t.name for t in tasks]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise MtnlgError(f"two tasks are named {twice!r} (a task is named after its file); rename one of the files")
    if options.stride is not None and not 0 < options.stride <= max_len:
        raise MtnlgError(f"stride {options.stride} must be 1 to the model's context, {max_len}")
    planned = []
    for t, task in enumerate(tasks):
        shots = 0 if task.kind == "loglikelihood_rolling" else options.num_fewshot
        for index in range(_size(task, options)):
            prompts = [] if task.kind == "loglikelihood_rolling" else task.prompts(index, shots, options.seed)
            planned.append(Planned(t, index, prompts, _requests(task, index, prompts, tokenizer, max_len, options)))
    return planned


def run(scorer: Scorer, tokenizer: Tokenizer, tasks: Sequence[Task], planned: list[Planned], options: Options,
        ranks: tuple[int, int] = (0, 1)) -> list[TaskResult]:
    """Score this rank's share of `planned` in one batched pass, gather every rank's answers, and compute
    each task's metrics."""
    rank, count = ranks
    mine = planned[rank::count]
    pairs = [pair for p in mine if p.requests is not None for pair in p.requests]
    generations = [(p.prompts[0], tasks[p.task].docs[p.index]["until"]) for p in mine if p.requests is None]
    bar = tqdm(total=len(pairs) + len(generations), desc="eval", unit=" requests", file=sys.stderr,
               disable=not options.progress or None, dynamic_ncols=True)
    scored = iter(scorer.loglikelihoods(pairs, progress=bar.update))
    generated = iter(generate_until(scorer, generations, options.max_gen_tokens, options.truncate, bar.update))
    bar.close()
    answers = {}
    for p in mine:
        answer = next(generated) if p.requests is None else [next(scored) for _ in p.requests]
        answers[(p.task, p.index)] = {"arguments": p.prompts, "resps": answer}
    if count > 1:
        answers = _gathered(answers)
    return [_result(t, task, answers, options, tokenizer) for t, task in enumerate(tasks)]


def _size(task: Task, options: Options) -> int:
    return min(len(task.docs), options.limit) if options.limit else len(task.docs)


def _requests(task: Task, index: int, prompts: list[str], tokenizer: Tokenizer, max_len: int,
              options: Options) -> list[Pair] | None:
    """The (context, continuation) token pairs of one document; None for a generation."""
    doc = task.docs[index]
    if task.kind == "generate_until":
        tokens = len(tokenizer.encode(prompts[0]))
        if tokens + options.max_gen_tokens > max_len and not options.truncate:
            raise MtnlgError(
                f"{_where(task, index)}: the prompt is {tokens} tokens and up to {options.max_gen_tokens} may be "
                f"generated, over the model's context of {max_len}; lower --max-gen-tokens, or pass --truncate to "
                "drop context from the left (as lm-eval does)"
            )
        return None
    if task.kind == "loglikelihood_rolling":
        ids = doc["ids"] if "ids" in doc else tokenizer.encode(doc["text"])
        if not ids:
            raise MtnlgError(f"{_where(task, index)}: the document is empty; give it some text")
        return list(rolling_windows(ids, tokenizer.bos_id, max_len, options.stride))
    if not all(doc.get("choices", [True])):
        raise MtnlgError(f"{_where(task, index)}: a choice is empty; give every choice some text")
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in task.pairs(index, prompts)]
    for context, continuation in pairs:
        if not continuation:
            raise MtnlgError(f"{_where(task, index)}: a continuation or choice is empty; give every one some text")
        if not fits((context, continuation), max_len) and (not options.truncate or len(continuation) > max_len):
            raise _too_long(task, index, len(context) + len(continuation) - 1, max_len)
    return pairs


def _where(task: Task, index: int) -> str:
    return f"{task.path}:{task.lines[index]}" if task.lines else f"{task.path} document {index}"


def _too_long(task: Task, index: int, tokens: int, max_len: int) -> MtnlgError:
    return MtnlgError(
        f"{_where(task, index)}: the request is {tokens} tokens but the model's context is {max_len}; shorten it, "
        "use fewer few-shot examples, or pass --truncate to drop context from the left (as lm-eval does)"
    )


def generate_until(scorer: Scorer, requests: Sequence[tuple[str, Sequence[str]]], max_tokens: int, truncate: bool,
                   progress: Progress | None = None) -> list[str]:
    """Greedy continuations of (prompt, stop strings), each cut before its first stop string (lm-eval's
    generate_until); requests with the same stop strings decode together."""
    texts = [""] * len(requests)
    for until in dict.fromkeys(tuple(u) for _, u in requests):
        members = [i for i, (_, u) in enumerate(requests) if tuple(u) == until]
        outputs = scorer.generate([requests[i][0] for i in members], list(until), max_tokens, truncate)
        for i, text in zip(members, outputs):
            texts[i] = text
        if progress:
            progress(len(members))
    return texts


def _gathered(answers: dict) -> dict:
    import torch.distributed as dist

    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, answers)
    return {k: v for part in everyone for k, v in part.items()}


def _normalized_answer(text: str) -> list[str]:
    """SQuAD's normalization for token F1: lower case, no punctuation or articles."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _f1(prediction: str, answer: str) -> float:
    ours, theirs = _normalized_answer(prediction), _normalized_answer(answer)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if not ours or not theirs:
        return float(ours == theirs)
    return _f_measure(common, len(ours), len(theirs))


def _f_measure(common: int, predicted: int, expected: int) -> float:
    """The harmonic mean of precision (common / predicted) and recall (common / expected)."""
    return 0.0 if common == 0 else 2 * common / (predicted + expected)


def _rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokens: lower case, runs of anything but a-z and 0-9 are spaces, no stemming."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F-measure: the longest common subsequence of the two token lists, over each one's length."""
    ours, theirs = _rouge_tokens(prediction), _rouge_tokens(answer)
    row = [0] * (len(theirs) + 1)  # row[j]: LCS of the prediction so far and theirs[:j]
    for token in ours:
        diagonal = 0
        for j, other in enumerate(theirs, 1):
            diagonal, row[j] = row[j], (diagonal + 1 if token == other else max(row[j], row[j - 1]))
    return _f_measure(row[-1], len(ours), len(theirs))


def _corpus_score(metric: str, predictions: list[str], answers: list[list[str]]) -> float:
    """sacrebleu's corpus chrF or BLEU of the stripped predictions; every answer of a document is a reference
    (a document with fewer answers than another has None in the streams it lacks, as sacrebleu expects)."""
    streams = [[a[i].strip() if i < len(a) else None for a in answers] for i in range(max(map(len, answers)))]
    from sacrebleu.metrics import BLEU, CHRF  # here: training imports this module, and needs no sacrebleu

    return (CHRF() if metric == "chrf" else BLEU()).corpus_score([p.strip() for p in predictions], streams).score


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equals, as numpy's


def _doc_metrics(task: Task, doc: dict, answer, tokenizer: Tokenizer) -> dict:
    if task.kind == "multiple_choice":
        lls = [ll for ll, _ in answer]
        metrics = {"acc": float(_argmax(lls) == doc["gold"])}
        if "choices" in doc:  # lm-eval normalizes by the choice's length in characters
            metrics["acc_norm"] = float(_argmax([ll / len(c) for ll, c in zip(lls, doc["choices"])]) == doc["gold"])
        return metrics
    if task.kind == "loglikelihood":
        return {"acc": float(answer[0][1]), "perplexity": answer[0][0]}
    if task.kind == "generate_until":
        return {"exact_match": float(any(answer.strip() == a.strip() for a in doc["answers"])),
                "f1": max(_f1(answer, a) for a in doc["answers"]),
                "rouge_l": max(_rouge_l(answer, a) for a in doc["answers"])}
    text = doc["text"] if "text" in doc else tokenizer.decode(doc["ids"])
    tokens = len(doc["ids"]) if "ids" in doc else len(tokenizer.encode(text))
    return {"loglikelihood": sum(ll for ll, _ in answer), "tokens": tokens,
            "words": len(re.split(r"\s+", text)), "bytes": len(text.encode())}


def _aggregate(kind: str, samples: list[dict]) -> dict[str, float]:
    def total(key: str) -> float:
        return sum(s[key] for s in samples)

    out: dict[str, float] = {}
    for metric, how in METRICS[kind].items():
        if how == "mean":
            if metric not in samples[0]:
                continue
            values = [s[metric] for s in samples]
            n = len(values)
            out[metric] = mean = sum(values) / n
            out[f"{metric}_stderr"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
        elif how in ("chrf", "bleu"):
            out[metric] = _corpus_score(how, [s["resps"] for s in samples], [s["doc"]["answers"] for s in samples])
        elif how == "perplexity":
            out[metric] = math.exp(-total(metric) / len(samples))
        else:
            nats = -total("loglikelihood") / total(ROLLING_UNIT[metric])
            out[metric] = {"weighted_perplexity": math.exp(nats), "bits_per_byte": nats / math.log(2)}.get(how, nats)
    return out


def _result(t: int, task: Task, answers: dict, options: Options, tokenizer: Tokenizer) -> TaskResult:
    samples = []
    for index, doc in enumerate(task.docs[: _size(task, options)]):
        answer = answers[(t, index)]
        samples.append({"doc_id": index, "doc": {k: v for k, v in doc.items() if k != "ids"}, **answer,
                        **_doc_metrics(task, doc, answer["resps"], tokenizer)})
    shots = 0 if task.kind == "loglikelihood_rolling" else options.num_fewshot
    return TaskResult(task, _aggregate(task.kind, samples), samples, shots)
