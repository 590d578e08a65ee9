"""Sampling settings and the choice of the next token: one set of defaults for the CLI, the Python API
and the server, applied to each sequence with its own settings and its own random generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT


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
            # below 1e-3 the scaled logits overflow fp32 (and sampling is greedy anyway): say 0 for greedy
            "temperature 0 or >= 1e-3": self.temperature == 0 or self.temperature >= 1e-3,
            "top_k >= 0": self.top_k >= 0,
            "0 < top_p <= 1": 0 < self.top_p <= 1,
            "0 <= min_p < 1": 0 <= self.min_p < 1,
            "repetition_penalty >= 1e-3": self.repetition_penalty >= 1e-3,
            "0 <= seed < 2**62": self.seed is None or 0 <= self.seed < 2**62,
            "n >= 1": self.n >= 1,
            "num_beams >= 1": self.num_beams >= 1,
            "n <= num_beams with beam search": self.num_beams == 1 or self.n <= self.num_beams,
            "logprobs >= 0": self.logprobs is None or self.logprobs >= 0,
        }
        broken = [rule for rule, ok in checks.items() if not ok]
        if broken:
            raise MtnlgError(f"invalid sampling settings: need {', '.join(broken)}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def stop_ids(self, eod_id: int) -> set[int]:
        """Tokens that end a sequence (not part of its text)."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else {eod_id})

    def cut(self, text: str) -> str | None:
        """`text` up to the first stop string in it, or None when it holds none."""
        hits = [text.find(s) for s in self.stop if s in text]
        return text[: min(hits)] if hits else None


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


def seeded_generators(model: GPT, params: Sampling, count: int) -> list[torch.Generator]:
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
