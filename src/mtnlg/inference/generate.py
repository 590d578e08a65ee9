"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p; streamed as text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.tokenizer import Tokenizer


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise MtnlgError(
                "sampling needs max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; "
                f"got {self.max_new_tokens}, {self.temperature}, {self.top_k}, {self.top_p}"
            )


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability reaches top-p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens entirely past the top-p mass
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: GPT, prompt: Sequence[int], params: Sampling, stop_ids: Sequence[int] = ()
) -> Iterator[int]:
    """Yield new token ids one at a time until max_new_tokens, a stop id, or the context is full."""
    context = model.cfg.max_seq_len
    if not prompt:
        raise MtnlgError("the prompt is empty; pass some text to continue")
    if len(prompt) >= context:
        raise MtnlgError(f"the prompt has {len(prompt)} tokens but the model's context is {context}; shorten it")
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
    steps = min(params.max_new_tokens, context - len(prompt))
    cache = KVCache(model.cfg, 1, len(prompt) + steps, device, next(model.parameters()).dtype)
    tokens = torch.tensor([list(prompt)], device=device)
    for _ in range(steps):
        token = sample(model(tokens, cache=cache)[:, -1], params, generator)
        yield int(token)
        if int(token) in stop_ids:
            return
        tokens = token[:, None]


def stream_text(model: GPT, tokenizer: Tokenizer, prompt: str, params: Sampling) -> Iterator[str]:
    """Yield text deltas; a multi-byte character split across tokens is held back until complete."""
    ids: list[int] = []
    emitted = ""
    for token in generate_ids(model, tokenizer.encode(prompt), params, stop_ids=(tokenizer.eod_id,)):
        if token == tokenizer.eod_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            yield text[len(emitted) :]
            emitted = text


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, params: Sampling) -> str:
    return "".join(stream_text(model, tokenizer, prompt, params))
