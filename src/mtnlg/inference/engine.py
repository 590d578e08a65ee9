"""The one decode loop: a scheduler that owns the model and steps it, with sequences joining and leaving.

Each sequence owns a slot of the KV cache while it runs. Every step first decodes one token for every
sequence that has read its prompt, then spends what is left of the step's token budget reading prompts,
a long one in chunks (vLLM's order: decode first, chunked prefill), so running streams keep flowing while
a new prompt is read. A finished or cancelled sequence frees its slot at once and the next waiting one
takes it. A free slot still holds its last sequence's keys and values: a new prompt that starts the same
way (a shared system prompt, a few-shot preamble) takes the slot with the longest common prefix and reads
only the rest. Offline generation (`generate`, `stream`) and the server run on this same loop.

Every sequence samples with its own settings and its own generator, and attends only to its own slot, so
its tokens do not depend on what else is running. Under tensor parallelism every process runs the same
schedule on the same inputs, so all of them choose the same tokens.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from mtnlg.inference.sampling import Sampling, choose, penalize
from mtnlg.model.gpt import GPT
from mtnlg.model.kv_cache import KVCache
from mtnlg.parallel import whole
from mtnlg.tokenizer import Tokenizer

_arrivals = itertools.count()

PREFILL_TOKENS = 512

# Prompt chunks read in one forward are padded to the widest; a chunk joins a forward only while the
# padding stays under this share of the real tokens (else it gets a forward of its own in the same step).
PADDING_SLACK = 0.25


@dataclass(eq=False)
class Request:
    """One completion being generated (a request for n completions is n of these): the prompt, its settings, and what has come out so far."""

    prompt: list[int]
    params: Sampling
    generator: torch.Generator
    index: int = 0  # which prompt of the request
    ids: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop", "length", "cancelled" or "error"
    text: str | None = None  # set once a stop string cut it
    logprobs: list[float] = field(default_factory=list)  # of each generated token, raw distribution
    top: list[dict[str, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # with echo and logprobs: None for the first token
    prompt_top: list[dict[str, float] | None] | None = None
    cancelled: bool = False  # set from anywhere; the engine frees the slot at its next step
    slot: int | None = None
    read: int = 0  # prompt tokens in the cache
    pending: int | None = None  # the last chosen token, not yet in the cache
    sent: int = 0  # characters handed out by `delta`
    arrival: int = field(default_factory=lambda: next(_arrivals))
    _counts: torch.Tensor | None = None  # penalties: tokens generated so far, tokens seen
    _seen: torch.Tensor | None = None
    _decoded: tuple[int, str] = (0, "")  # the text of ids[:n]: decoded once per new token, however often asked

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.echo and self.params.logprobs is not None

    def output(self, tokenizer: Tokenizer) -> str:
        if self.text is not None:
            return self.text
        if self._decoded[0] != len(self.ids):  # ids only grow
            self._decoded = (len(self.ids), tokenizer.decode(self.ids))
        return self._decoded[1]

    def delta(self, tokenizer: Tokenizer) -> str:
        """The text that can be shown since the last call: a multi-byte character split across tokens,
        and text that may be the start of a stop string, are held back until they resolve, so the deltas
        join to exactly the final text."""
        text = self.output(tokenizer)
        ready = len(text) if self.finish else safe_length(text, self.params.stop)
        if ready <= self.sent:
            return ""
        piece, self.sent = text[self.sent : ready], ready
        return piece


def safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: not a trailing partial character, nor a possible stop-string start."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    held = max((k for s in stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
    return end - held


class Engine:
    """Continuous batching over `max_num_seqs` slots; `step()` advances everything by one step.

    token_budget caps the tokens of one step (decode rows plus prompt chunks): small for a server, so that
    a step stays short. The default adds PREFILL_TOKENS for prompts to one token per slot: offline, reading
    more at once was slower, not faster (GPT-2 shape on CPU, docs/benchmarks.md).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_num_seqs: int,
        token_budget: int | None = None,
        max_len: int | None = None,
        reuse_prefixes: bool = True,
    ):
        self.model, self.tokenizer, self.reuse_prefixes = model, tokenizer, reuse_prefixes
        self.max_len = max_len or model.cfg.max_seq_len
        self.token_budget = token_budget or max_num_seqs + PREFILL_TOKENS
        if self.token_budget <= max_num_seqs:
            raise ValueError(f"token budget {self.token_budget} must exceed max_num_seqs {max_num_seqs}, or prompts starve")
        weight = next(model.parameters())
        self.cache = KVCache(model.cfg, max_num_seqs, self.max_len, weight.device, weight.dtype)
        self.device, self.vocab = weight.device, model.cfg.vocab_size
        self.slots: list[Request | None] = [None] * max_num_seqs
        self.held: list[list[int]] = [[] for _ in range(max_num_seqs)]  # what each free slot's cache holds
        self.reused = 0  # prompt tokens not read again, thanks to a held prefix
        self.waiting: deque[Request] = deque()
        self.changed: list[Request] = []  # by the current (or last) step

    @property
    def running(self) -> list[Request]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def add(self, seq: Request) -> None:
        room = 1 if seq.params.max_new_tokens else 0  # a prompt only scored (echo) may fill the context
        if not seq.prompt or len(seq.prompt) + room > self.max_len:
            raise ValueError(f"a prompt of {len(seq.prompt)} tokens does not fit a context of {self.max_len}")
        self.waiting.append(seq)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Free cancelled slots, admit waiting sequences, decode, read prompts. Returns the sequences that
        changed (a new token, or finished)."""
        self.changed = []  # every sequence that gets a token or finishes, as it does: `fail` reports them too
        for seq in self.running:
            if seq.cancelled:
                self._release(seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.finish = "cancelled"
            self.changed.append(seq)
        while self.waiting and None in self.slots:
            self._admit(self.waiting.popleft())
        decoding = [s for s in self.running if s.pending is not None]
        if decoding:
            self._decode(decoding)
        budget = self.token_budget - len(decoding)
        chunks = []
        for seq in sorted((s for s in self.running if s.read < len(s.prompt)), key=lambda s: s.arrival):
            if budget <= 0:
                break
            take = min(len(seq.prompt) - seq.read, budget)
            chunks.append((seq, take))
            budget -= take
        for group in _similar_widths(chunks):
            self._prefill(group)
        return list(dict.fromkeys(self.changed))

    def fail(self) -> list[Request]:
        """After a step raised: end every running sequence with "error", free its slot, and return them with
        those the step had changed before it raised."""
        for seq in self.running:
            self._release(seq, "error")
        return list(dict.fromkeys(self.changed))

    def _admit(self, seq: Request) -> None:
        """Into the free slot holding the longest prefix of its prompt (the lowest free slot when none
        does); the held part is not read again. At least the prompt's last token is read, for its logits."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        shared = {i: _common_prefix(self.held[i], seq.prompt) for i in free}
        if not self.reuse_prefixes or seq.wants_prompt_logprobs:  # prompt log-probabilities need every logit
            shared = dict.fromkeys(free, 0)
        seq.slot = max(free, key=lambda i: (shared[i], -i))
        seq.read = min(shared[seq.slot], len(seq.prompt) - 1)
        self.reused += seq.read
        self.slots[seq.slot], self.held[seq.slot] = seq, []
        self.cache.reset(seq.slot, seq.read)

    def _release(self, seq: Request, finish: str) -> Request:
        self.changed.append(seq)
        seq.finish = seq.finish or finish
        self.slots[seq.slot] = None
        self.held[seq.slot] = (seq.prompt + seq.ids)[: int(self.cache.lengths[seq.slot])]  # tokens go in in this order
        return seq

    def _decode(self, decoding: list[Request]) -> None:
        # The first n slots run as one batch, read in place; slots in that range that are not decoding
        # (free, or still reading a prompt) ride along with no real token.
        n = max(s.slot for s in decoding) + 1
        tokens = torch.zeros(n, 1, dtype=torch.long)
        counts = torch.zeros(n, dtype=torch.long)
        for seq in decoding:
            tokens[seq.slot, 0], counts[seq.slot] = seq.pending, 1
        self.cache.select(torch.arange(n), counts)
        logits = whole(self.model(tokens.to(self.device), cache=self.cache, last_only=True)[:, 0]).float()
        for seq in decoding:
            self.changed.append(seq)
            self._accept(seq, logits[seq.slot])

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        width = max(take for _, take in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, (seq, take) in enumerate(chunks):
            tokens[i, :take] = torch.tensor(seq.prompt[seq.read : seq.read + take])
        self.cache.select(torch.tensor([seq.slot for seq, _ in chunks]), torch.tensor([take for _, take in chunks]))
        full = any(seq.wants_prompt_logprobs for seq, _ in chunks)  # every position's logits, not just the last
        logits = whole(self.model(tokens.to(self.device), cache=self.cache, last_only=not full)).float()
        for i, (seq, take) in enumerate(chunks):
            if seq.wants_prompt_logprobs:
                self._score_prompt(seq, logits[i, :take])
            seq.read += take
            if seq.read < len(seq.prompt):
                continue
            self.changed.append(seq)
            if seq.params.max_new_tokens == 0:
                self._release(seq, "length")
            else:
                self._accept(seq, logits[i, take - 1 if full else 0])

    def _score_prompt(self, seq: Request, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this chunk's logits predict (the legacy echo shape)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs, seq.prompt_top = [None], [None]
        logprobs = logits.log_softmax(-1)
        targets = seq.prompt[seq.read + 1 : seq.read + 1 + logprobs.size(0)]
        for row, token in zip(logprobs, targets):
            seq.prompt_logprobs.append(row[token].item())
            seq.prompt_top.append(self._top(row, seq.params.logprobs))

    def _top(self, logprobs: torch.Tensor, k: int) -> dict[str, float]:
        if not k:
            return {}
        top = logprobs.topk(k)
        return {self.tokenizer.decode([t]): v for v, t in zip(top.values.tolist(), top.indices.tolist())}

    def _accept(self, seq: Request, logits: torch.Tensor) -> None:
        """Choose the sequence's next token from its logits [vocab] and decide whether it goes on."""
        params = seq.params
        seq.pending = None
        penalized = logits[None]
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            if seq._counts is None:
                seq._counts = torch.zeros(1, self.vocab, device=self.device)
                seq._seen = torch.zeros(1, self.vocab, dtype=torch.bool, device=self.device)
                seq._seen[0, seq.prompt] = True
            penalized = penalize(penalized, params, seq._counts, seq._seen)
        token = int(choose(penalized, params, [seq.generator])[0])
        if token in params.stop_ids(self.tokenizer.eod_id):
            self._release(seq, "stop")
            return
        seq.ids.append(token)
        if seq._counts is not None:
            seq._counts[0, token] += 1
            seq._seen[0, token] = True
        if params.logprobs is not None:
            raw = logits.log_softmax(-1)
            seq.logprobs.append(raw[token].item())
            if params.logprobs:
                seq.top.append(self._top(raw, params.logprobs))
        if params.stop:
            seq.text = params.cut(seq.output(self.tokenizer))
            if seq.text is not None:
                self._release(seq, "stop")
                return
        if len(seq.ids) >= params.max_new_tokens or len(seq.prompt) + len(seq.ids) >= self.max_len:
            self._release(seq, "length")
        else:
            seq.pending = token


def _similar_widths(chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """Group (request, tokens) chunks into forwards whose padding is at most PADDING_SLACK of their tokens."""
    groups: list[list[tuple[Request, int]]] = []
    for chunk in sorted(chunks, key=lambda c: -c[1]):
        for group in groups:
            width, real = group[0][1], sum(take for _, take in group) + chunk[1]
            if (len(group) + 1) * width <= (1 + PADDING_SLACK) * real:
                group.append(chunk)
                break
        else:
            groups.append([chunk])
    return groups


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
