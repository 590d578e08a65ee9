"""Text generation with a KV cache: batched sampling, beam search, streaming, and scoring.

A batch of prompts of different lengths is left-padded; the cache masks the padding and each row
gets its own positions and random generator, so a prompt's output does not depend on its batch.

A tensor-parallel model (`mtnlg.load(..., tp=N)` in each of N processes) runs the same code: every
process gathers the whole logits and draws from the same seed, so all choose the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.parallel import whole
from mtnlg.tokenizer import Tokenizer

# Sequences decoded (or scored) together by default: batches amortize reading the weights, and a cap keeps
# the KV cache and padding of a long prompts file bounded.
BATCH_SIZE = 16


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # drop tokens below min_p x the top probability; 0: off
    repetition_penalty: float = 1.0  # CTRL-style, on every token seen in prompt or output; 1: off
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output so far
    stop: Sequence[str] = ()  # the text ends before the first of these
    stop_token_ids: Sequence[int] = ()  # besides the end-of-document token
    ignore_eos: bool = False  # keep going past the end-of-document token (fixed-length benchmarks)
    seed: int | None = None  # same seed, same text
    n: int = 1  # completions per prompt
    num_beams: int = 1  # > 1: beam search (deterministic; ignores the sampling knobs)
    length_penalty: float = 1.0  # beam score = log-probability / generated length ** length_penalty
    logprobs: int | None = None  # None: off; N: log-probability of each chosen token and the top N alternatives
    echo: bool = False  # prepend the prompt to the returned text
    truncate: bool = False  # cut an overlong prompt from the left instead of refusing it

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens >= 0": self.max_new_tokens >= 0,
            "temperature >= 0": self.temperature >= 0,
            "top_k >= 0": self.top_k >= 0,
            "0 < top_p <= 1": 0 < self.top_p <= 1,
            "0 <= min_p < 1": 0 <= self.min_p < 1,
            "repetition_penalty > 0": self.repetition_penalty > 0,
            "n >= 1": self.n >= 1,
            "num_beams >= 1": self.num_beams >= 1,
            "n <= num_beams with beam search": self.num_beams == 1 or self.n <= self.num_beams,
            "logprobs >= 0": self.logprobs is None or self.logprobs >= 0,
        }
        broken = [rule for rule, ok in checks.items() if not ok]
        if broken:
            raise MtnlgError(f"invalid sampling settings: need {', '.join(broken)}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    index: int = 0  # which prompt of the request
    logprobs: list[float] | None = None  # of each generated token, under the model's raw distribution
    top_logprobs: list[dict[str, float]] | None = None


@dataclass
class _Row:
    prompt: list[int]
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None  # set once a stop string cut it
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)


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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, outside the smallest set whose probability reaches
    top-p, or below min_p times the most likely token's probability."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens entirely past the top-p mass
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def penalize(logits: torch.Tensor, params: Sampling, counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """counts: [batch, vocab] tokens generated so far; seen: [batch, vocab] tokens in prompt or output."""
    if params.repetition_penalty != 1.0:
        damped = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, damped, logits)
    if params.presence_penalty:
        logits = logits - params.presence_penalty * (counts > 0)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * counts
    return logits


def choose(logits: torch.Tensor, params: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]; each row draws from its own generator."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def _generators(model: GPT, params: Sampling, count: int) -> list[torch.Generator]:
    """One generator per completion: seeded from (seed, k) so that the k-th of n samples is reproducible."""
    device = next(model.parameters()).device
    seed = params.seed if params.seed is not None else _shared_seed(model, int(torch.randint(0, 2**62, ())))
    return [torch.Generator(device).manual_seed(seed + 1_000_003 * k) for k in range(count)]


def _shared_seed(model: GPT, seed: int) -> int:
    """The first process's seed, on every process holding a shard of `model` (its weights are DTensors);
    checked by duck type so that single-process generation never imports torch.distributed.tensor."""
    weight = next(model.parameters())
    if not hasattr(weight, "device_mesh"):
        return seed
    import torch.distributed as dist

    mesh = weight.device_mesh
    value = torch.tensor([seed], device=mesh.device_type)
    dist.broadcast(value, group=mesh.get_group(), group_src=0)
    return int(value)


@torch.no_grad()
def _decode(model: GPT, tokenizer: Tokenizer, rows: list[_Row], params: Sampling) -> Iterator[None]:
    """Advance every row one token per iteration, in one batched forward, until all have finished."""
    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    stop_ids = _stop_ids(tokenizer, params)
    width = max(len(r.prompt) for r in rows)
    steps = min(params.max_new_tokens, model.cfg.max_seq_len - width)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
        valid[i, width - len(row.prompt) :] = True
    tokens, valid = tokens.to(device), valid.to(device)
    cache = KVCache(model.cfg, len(rows), width + max(steps, 1), device, next(model.parameters()).dtype)
    cache.set_padding(valid)
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    next_position = valid.sum(1)
    counts = torch.zeros(len(rows), vocab, device=device)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        seen[i, row.prompt] = True
    for _ in range(steps):
        logits = _next_logits(model, tokens, cache, positions)
        chosen = choose(penalize(logits, params, counts, seen), params, [r.generator for r in rows])
        raw = logits.log_softmax(-1) if params.logprobs is not None else None
        for i, (row, token) in enumerate(zip(rows, chosen.tolist())):
            if row.finish:
                continue
            if token in stop_ids:
                row.finish = "stop"
                continue
            row.ids.append(token)
            counts[i, token] += 1
            seen[i, token] = True
            if raw is not None:
                row.logprobs.append(raw[i, token].item())
                if params.logprobs:
                    top = raw[i].topk(params.logprobs)
                    row.top.append({tokenizer.decode([t]): v for v, t in zip(top.values.tolist(), top.indices.tolist())})
            if params.stop:
                _cut_at_stop(row, tokenizer.decode(row.ids), params.stop)
        yield
        if all(r.finish for r in rows):
            return
        tokens, positions = chosen[:, None], next_position[:, None]
        next_position = next_position + 1
    for row in rows:
        row.finish = row.finish or "length"


def _next_logits(model: GPT, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits [batch, vocab] for the token after `tokens` (whole ones under tensor parallelism)."""
    return whole(model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]).float()


def _stop_ids(tokenizer: Tokenizer, params: Sampling) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else {tokenizer.eod_id})


def _text(row: _Row, tokenizer: Tokenizer) -> str:
    return row.text if row.text is not None else tokenizer.decode(row.ids)


def _cut_at_stop(row: _Row, text: str, stops: Sequence[str]) -> None:
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        row.text, row.finish = text[: min(hits)], "stop"


@torch.no_grad()
def _beam_search(model: GPT, tokenizer: Tokenizer, prompt: list[int], params: Sampling) -> list[_Row]:
    """Keep the `num_beams` most probable continuations; a beam that emits a stop token becomes a
    hypothesis scored by log-probability / length ** length_penalty. Returns the best `n`."""
    device = next(model.parameters()).device
    beams, vocab = params.num_beams, model.cfg.vocab_size
    stop_ids = _stop_ids(tokenizer, params)
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
    rows = [_Row(prompt, torch.Generator(), ids=ids, finish=finish) for _, ids, finish in best]
    for row in rows if params.stop else ():
        _cut_at_stop(row, tokenizer.decode(row.ids), params.stop)
    return rows


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
    """`generate`, yielding each batch's completions as it finishes. All prompts are encoded (and an
    overlong one refused) before any decoding starts."""
    _check_batch_size(batch_size)
    encoded = [encode_prompt(tokenizer, p, model.cfg.max_seq_len, params) for p in prompts]
    per_batch = max(1, batch_size // params.n)  # whole prompts, each with its n sequences
    for start in range(0, len(encoded), per_batch):
        batch = encoded[start : start + per_batch]
        if params.num_beams > 1:
            rows = [row for ids in batch for row in _beam_search(model, tokenizer, ids, params)]
        else:
            rows = [_Row(ids, g) for ids in batch for g in _generators(model, params, params.n)]
            for _ in _decode(model, tokenizer, rows, params):
                pass
        for i, row in enumerate(rows):
            text = _text(row, tokenizer)
            yield Completion(
                text=(tokenizer.decode(row.prompt) + text) if params.echo else text,
                token_ids=row.ids,
                finish_reason=row.finish,
                prompt_tokens=len(row.prompt),
                index=start + i // params.n,
                logprobs=row.logprobs if params.logprobs is not None else None,
                top_logprobs=row.top if params.logprobs else None,
            )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MtnlgError(f"batch size {batch_size} is not positive; pass at least 1 (sequences run together)")


def stream(model: GPT, tokenizer: Tokenizer, prompt: str, params: Sampling) -> Iterator[str]:
    """Yield text deltas as tokens arrive. A multi-byte character split across tokens, and text that
    may be the start of a stop string, are held back until they resolve; the deltas join to exactly
    the text `generate` returns."""
    if params.n != 1 or params.num_beams != 1:
        raise MtnlgError("streaming gives one completion: use n=1 and num_beams=1")
    row = _Row(encode_prompt(tokenizer, prompt, model.cfg.max_seq_len, params), _generators(model, params, 1)[0])
    if params.echo:
        yield prompt
    sent = 0
    for _ in _decode(model, tokenizer, [row], params):
        text = _text(row, tokenizer)
        ready = len(text) if row.finish else _safe_length(text, params.stop)
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    text = _text(row, tokenizer)
    if len(text) > sent:
        yield text[sent:]


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown: not a trailing partial character, nor a possible stop-string start."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    held = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - held


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
