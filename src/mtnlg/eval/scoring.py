"""Log-likelihoods of continuations: the one primitive that every evaluation reduces to, and the two
scorers that compute it.

A request is token ids (context, continuation); its answer is (log p(continuation | context), whether
greedy decoding gives exactly the continuation). The numbers are those of lm-evaluation-harness's `hf`
backend, which reads context + continuation[:-1] whole for every request, keeping the last max_len + 1
tokens of an overlong one.

`ModelScorer` is the fast one, for a model loaded for inference (one process, or split by tensor
parallelism): requests that share a context (the choices of one question) read it once, its keys and
values copied into one cache row per continuation; batches are filled longest first under a token budget,
and the LM head reads only the continuations' positions (each batch's padded to its longest), never a context's.

`RowScorer` is the one that runs on whatever training built (tensor and sequence parallel, pipeline
stages, FSDP): every request is one row of a fixed [rows, max_len] batch, the shape training's own
forward takes, and every data-parallel rank runs the same number of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from mtnlg.defaults import TOKEN_BUDGET
from mtnlg.errors import MtnlgError
from mtnlg.inference.generate import generate
from mtnlg.inference.sampling import Sampling
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.parallel import whole
from mtnlg.tokenizer import Tokenizer

Pair = tuple[Sequence[int], Sequence[int]]
Answer = tuple[float, bool]
Progress = Callable[[int], None]


class Scorer(Protocol):
    """What the harness needs from a model: scores of requests (`progress(n)` told as n are done) and,
    for generate_until tasks, greedy continuations cut before the first stop string."""

    max_len: int

    def loglikelihoods(self, requests: Sequence[Pair], progress: Progress | None = None) -> list[Answer]: ...

    def generate(self, prompts: list[str], until: list[str], max_tokens: int, truncate: bool) -> list[str]: ...


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's boundary rule: trailing spaces of the context belong to the continuation, whose tokens are
    the tail of the whole string's encoding (so a word split across the boundary is tokenized as one word).
    An empty context (or one of spaces only) is the prefix token, lm-eval's BOS-else-EOS."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int, stride: int | None = None) -> Iterator[Pair]:
    """(context, continuation) pairs that score every token of a long document exactly once, as lm-eval's
    loglikelihood_rolling does: the first window predicts up to max_len tokens after `prefix`, each later one
    the next `stride` tokens (default max_len: disjoint windows) with the max_len + 1 - stride tokens before
    them as context. A smaller stride gives each token more context and costs more forwards."""
    stride = stride or max_len
    tokens = list(tokens)
    done = min(max_len, len(tokens))
    if done:
        yield [prefix], tokens[:done]
    while done < len(tokens):
        end = min(len(tokens), done + stride)
        yield tokens[end - max_len - 1 : done], tokens[done:end]
        done = end


def fits(pair: Pair, max_len: int) -> bool:
    """Whether the model reads the whole request: context + continuation[:-1] within its context."""
    return len(pair[0]) + len(pair[1]) - 1 <= max_len


class ModelScorer:
    """Scores with a model loaded for inference (`mtnlg.load`, tensor parallel or not), reusing contexts."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, token_budget: int = TOKEN_BUDGET):
        self.model, self.tokenizer, self.token_budget = model, tokenizer, token_budget
        self.max_len = model.cfg.max_seq_len

    @torch.no_grad()
    def loglikelihoods(self, requests: Sequence[Pair], progress: Progress | None = None) -> list[Answer]:
        groups: dict[tuple[int, ...], list[int]] = {}  # requests by the context the model reads
        for i, (context, continuation) in enumerate(requests):
            _check(i, context, continuation, self.max_len)
            groups.setdefault(tuple(context)[-(self.max_len + 1 - len(continuation)) :], []).append(i)
        order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(requests[i][1]) for i in g[1])))
        results: list[Answer] = [(0.0, False)] * len(requests)
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        width = 0
        for context, members in order:
            group_width = len(context) + max(len(requests[i][1]) for i in members) - 1
            rows = sum(len(m) for _, m in batch) + len(members)
            if batch and rows * max(width, group_width) > self.token_budget:
                self._score_batch(batch, requests, results, width, progress)
                batch, width = [], 0
            batch.append((context, members))
            width = max(width, group_width)
        if batch:
            self._score_batch(batch, requests, results, width, progress)
        return results

    def _score_batch(self, batch: list, requests: Sequence[Pair], results: list, width: int, progress: Progress | None) -> None:
        model = self.model
        param = next(model.parameters())
        owner = torch.tensor([u for u, (_, members) in enumerate(batch) for _ in members])
        continuations = [list(requests[i][1]) for _, members in batch for i in members]
        cache = KVCache(model.cfg, len(batch), width, param.device, param.dtype)
        contexts, context_lengths = _padded([context for context, _ in batch], param.device)
        cache.select(counts=context_lengths)
        logits = whole(model(contexts, cache=cache, last_only=True)).float()[owner.to(param.device)]  # [rows, 1, vocab]
        steps = max(len(c) for c in continuations) - 1
        if steps:  # every continuation but its last token, on top of its own copy of the context
            cache.reorder(owner)
            inputs, lengths = _padded([c[:-1] for c in continuations], param.device)
            cache.select(counts=lengths)
            logits = torch.cat((logits, whole(model(inputs, cache=cache)).float()), dim=1)
        for row, i in enumerate(i for _, members in batch for i in members):
            target = torch.tensor(continuations[row], device=param.device)
            row_logits = logits[row, : len(target)]
            logprobs = F.log_softmax(row_logits, dim=-1).gather(-1, target[:, None])
            results[i] = (float(logprobs.sum()), bool((row_logits.argmax(-1) == target).all()))
        if progress:
            progress(len(continuations))

    def generate(self, prompts: list[str], until: list[str], max_tokens: int, truncate: bool) -> list[str]:
        """With `truncate`, a prompt keeps its last max_len - max_tokens tokens, as lm-eval's hf backend cuts it."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        if truncate:
            ids = [i[-max(1, self.max_len - max_tokens) :] for i in ids]
        params = Sampling(temperature=0.0, max_new_tokens=max_tokens, stop=until, truncate=truncate)
        return [c.text for c in generate(self.model, self.tokenizer, ids, params)]


class RowScorer:
    """Scores through `token_scores(inputs, targets)`: for fixed [rows, max_len] batches, each position's
    log p(target) and whether it is the argmax, on every rank. Ranks that split the requests (data
    parallel) run as many batches as the busiest of them, since FSDP gathers weights in every forward."""

    def __init__(self, token_scores: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 max_len: int, rows: int, device: torch.device):
        self.token_scores, self.max_len, self.rows, self.device = token_scores, max_len, rows, device

    @torch.no_grad()
    def loglikelihoods(self, requests: Sequence[Pair], progress: Progress | None = None) -> list[Answer]:
        for i, (context, continuation) in enumerate(requests):
            _check(i, context, continuation, self.max_len)
        batches = [requests[i : i + self.rows] for i in range(0, len(requests), self.rows)]
        results: list[Answer] = []
        for b in range(_most_over_ranks(len(batches), self.device)):
            batch = batches[b] if b < len(batches) else []  # a rank with fewer batches runs empty ones
            inputs = torch.zeros(self.rows, self.max_len, dtype=torch.long)
            targets = torch.zeros_like(inputs)
            spans = []
            for r, (context, continuation) in enumerate(batch):
                row = (list(context) + list(continuation))[-(self.max_len + 1) :]
                inputs[r, : len(row) - 1], targets[r, : len(row) - 1] = torch.tensor(row[:-1]), torch.tensor(row[1:])
                spans.append(slice(len(row) - 1 - len(continuation), len(row) - 1))
            logprobs, greedy = self.token_scores(inputs.to(self.device), targets.to(self.device))
            results += [(float(logprobs[r, s].sum()), bool(greedy[r, s].all())) for r, s in enumerate(spans)]
            if progress and batch:
                progress(len(batch))
        return results

    def generate(self, prompts: list[str], until: list[str], max_tokens: int, truncate: bool) -> list[str]:
        raise MtnlgError("generate_until tasks are not run during training; run them on a checkpoint with mtnlg eval")


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's log p(target) and whether the target is the argmax, from logits [rows, T, vocab]
    (whole ones under tensor parallelism)."""
    logits = whole(logits).float()
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return logprobs, logits.argmax(-1) == targets


def _check(i: int, context: Sequence[int], continuation: Sequence[int], max_len: int) -> None:
    if not context or not continuation or len(continuation) > max_len:
        raise ValueError(f"request {i}: need a context and 1 to {max_len} continuation tokens")


def _most_over_ranks(n: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return n
    count = torch.tensor(n, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def _padded(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [rows, longest] and each row's length."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), max(1, int(lengths.max())), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), lengths
