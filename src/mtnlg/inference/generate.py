"""Offline text generation on the engine's decode loop: batched sampling, streaming, beam search, scoring.

Prompts of different lengths share the engine's slots, each at its own position, so a prompt's output
does not depend on its batch. A tensor-parallel model (`mtnlg.load(..., tp=N)` in each of N processes)
runs the same code: every process gathers the whole logits and draws from the same seed, so all choose
the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtnlg.defaults import BATCH_SIZE
from mtnlg.errors import MtnlgError
from mtnlg.inference.engine import Engine, Request
from mtnlg.inference.sampling import Sampling, seeded_generators
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.parallel import whole
from mtnlg.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    index: int = 0  # which prompt of the request
    logprobs: list[float] | None = None  # of each generated token, under the model's raw distribution
    top_logprobs: list[dict[str, float]] | None = None


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], context: int, params: Sampling) -> list[int]:
    """A prompt is text, or token ids as they are."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise MtnlgError("the prompt is empty; pass some text to continue")
    if len(ids) >= context:
        if not params.truncate:
            raise MtnlgError(
                f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                "shorten it or allow left truncation (truncate=True, --truncate)"
            )
        ids = ids[-max(1, context - max(params.max_new_tokens, 1)) :]
    return ids


def _next_logits(model: GPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """fp32 logits [batch, vocab] for the token after `tokens` (whole ones under tensor parallelism)."""
    return whole(model(tokens, cache=cache, last_only=True)[:, -1]).float()


@torch.no_grad()
def _beam_search(model: GPT, tokenizer: Tokenizer, prompt: list[int], params: Sampling) -> list[Request]:
    """Keep the `num_beams` most probable continuations; a beam that emits a stop token becomes a
    hypothesis scored by log-probability / length ** length_penalty. Returns the best `n`."""
    device = next(model.parameters()).device
    beams, vocab = params.num_beams, model.cfg.vocab_size
    stop_ids = params.stop_ids(tokenizer.eod_id)
    steps = min(params.max_new_tokens, model.cfg.max_seq_len - len(prompt))
    cache = KVCache(model.cfg, beams, len(prompt) + max(steps, 1), device, next(model.parameters()).dtype)
    logits = _next_logits(model, torch.tensor([prompt] * beams, device=device), cache)
    scores = torch.full((beams,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    running: list[list[int]] = [[] for _ in range(beams)]
    done: list[tuple[float, list[int], str]] = []
    for _ in range(steps):
        total = (logits.log_softmax(-1) + scores[:, None]).flatten()
        candidates = total.topk(2 * beams)
        keep: list[tuple[float, int, int]] = []
        for score, index in zip(candidates.values.tolist(), candidates.indices.tolist()):
            beam, token = divmod(index, vocab)
            if token in stop_ids:
                done.append((score / (len(running[beam]) + 1) ** params.length_penalty, running[beam], "stop"))
            elif len(keep) < beams:
                keep.append((score, beam, token))
        if len(done) >= beams:
            break
        cache.reorder(torch.tensor([b for _, b, _ in keep], device=device))
        running = [running[b] + [t] for _, b, t in keep]
        scores = torch.tensor([s for s, _, _ in keep], device=device)
        logits = _next_logits(model, torch.tensor([[t] for _, _, t in keep], device=device), cache)
    else:
        done += [(s / max(1, len(ids)) ** params.length_penalty, ids, "length") for s, ids in zip(scores.tolist(), running)]
    best = sorted(done, key=lambda d: d[0], reverse=True)[: params.n]
    seqs = [Request(prompt, params, torch.Generator(), ids=ids, finish=finish) for _, ids, finish in best]
    for seq in seqs if params.stop else ():
        seq.text = params.cut(tokenizer.decode(seq.ids))
        seq.finish = "stop" if seq.text is not None else seq.finish
    return seqs


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    params: Sampling,
    batch_size: int = BATCH_SIZE,
) -> list[Completion]:
    """Complete every prompt `params.n` times; results are prompt-major (index tells the prompt)."""
    return list(completions(model, tokenizer, prompts, params, batch_size))


def completions(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    params: Sampling,
    batch_size: int = BATCH_SIZE,
) -> Iterator[Completion]:
    """`generate`, yielding completions in order as they finish; `batch_size` sequences run at once, a new
    one taking the slot of each that ends. All prompts are encoded (and an overlong one refused) before
    any decoding starts."""
    _check_batch_size(batch_size)
    encoded = [encode_prompt(tokenizer, p, model.cfg.max_seq_len, params) for p in prompts]
    if params.num_beams > 1:
        for index, ids in enumerate(encoded):
            for seq in _beam_search(model, tokenizer, ids, params):
                seq.index = index
                yield _completion(seq, tokenizer)
        return
    seqs = [Request(ids, params, g, index=i) for i, ids in enumerate(encoded) for g in seeded_generators(model, params, params.n)]
    if not seqs:
        return
    longest = max(len(ids) for ids in encoded)  # the cache needs no more room than this
    engine = Engine(model, tokenizer, min(batch_size, len(seqs)) , max_len=min(model.cfg.max_seq_len, longest + max(params.max_new_tokens, 1)))
    for seq in seqs:
        engine.add(seq)
    ready = 0
    while ready < len(seqs):
        engine.step()
        while ready < len(seqs) and seqs[ready].finish:
            yield _completion(seqs[ready], tokenizer)
            ready += 1


def _completion(seq: Request, tokenizer: Tokenizer) -> Completion:
    params, text = seq.params, seq.output(tokenizer)
    return Completion(
        text=(tokenizer.decode(seq.prompt) + text) if params.echo else text,
        token_ids=seq.ids,
        finish_reason=seq.finish,
        prompt_tokens=len(seq.prompt),
        index=seq.index,
        logprobs=seq.logprobs if params.logprobs is not None else None,
        top_logprobs=seq.top if params.logprobs else None,
    )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MtnlgError(f"batch size {batch_size} is not positive; pass at least 1 (sequences run together)")


def stream(model: GPT, tokenizer: Tokenizer, prompt: str, params: Sampling) -> Iterator[str]:
    """Yield text deltas as tokens arrive; they join to exactly the text `generate` returns."""
    if params.n != 1 or params.num_beams != 1:
        raise MtnlgError("streaming gives one completion: use n=1 and num_beams=1")
    seq = Request(encode_prompt(tokenizer, prompt, model.cfg.max_seq_len, params), params,
                   seeded_generators(model, params, 1)[0])
    if params.echo:
        yield prompt
    engine = Engine(model, tokenizer, 1)
    engine.add(seq)
    while engine.has_work():
        engine.step()
        piece = seq.delta(tokenizer)
        if piece:
            yield piece


@dataclass
class Scored:
    token_ids: list[int]
    logprobs: list[float]  # log p(token i | everything before it); the first token is conditioned on EOD

    @property
    def total(self) -> float:
        return sum(self.logprobs)


@torch.no_grad()
def score(model: GPT, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> list[Scored]:
    """Per-token log-likelihoods of each text, as a document start (after EOD); the evaluation primitive.
    Texts run `batch_size` at a time."""
    _check_batch_size(batch_size)
    sequences = [[tokenizer.eod_id, *tokenizer.encode(t)] for t in texts]
    longest = max((len(s) for s in sequences), default=0)
    if longest - 1 > model.cfg.max_seq_len:
        raise MtnlgError(f"a text has {longest - 1} tokens but the model's context is {model.cfg.max_seq_len}; split it")
    return [scored for start in range(0, len(sequences), batch_size)
            for scored in _score_batch(model, sequences[start : start + batch_size])]


def _score_batch(model: GPT, sequences: list[list[int]]) -> list[Scored]:
    batch = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
    for i, s in enumerate(sequences):
        batch[i, : len(s)] = torch.tensor(s)  # right padding: causal attention never looks at it
    batch = batch.to(next(model.parameters()).device)
    logprobs = F.log_softmax(whole(model(batch[:, :-1])).float(), -1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    return [Scored(s[1:], logprobs[i, : len(s) - 1].tolist()) for i, s in enumerate(sequences)]
