"""A decoder-only transformer in one file: GPT-2/MT-NLG style or Llama style, chosen by ModelConfig.

Parallelism (tensor, pipeline, data) is applied to this module from outside; keep it plain.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.kv_cache import KVCache


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Rotary(nn.Module):
    """Rotary position embedding, in the rotate-half convention that Llama checkpoints use."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Computed, never saved: a model built on the meta device recomputes them once it has memory."""
        with torch.device(self.inv_freq.device):
            exponents = torch.arange(0, self.cfg.head_dim, 2, dtype=torch.float32) / self.cfg.head_dim
        self.inv_freq.copy_(1.0 / self.cfg.rope_theta**exponents)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [batch, heads, seq, head_dim]; positions: [seq] or [batch, seq]."""
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        if angles.dim() == 3:  # per-sequence positions: broadcast over heads
            angles = angles[:, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(cfg) if cfg.position == "rotary" else None
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 instead of the head count lets tensor parallelism shard heads without touching this code.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and cache is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.size(1) != k.size(1),
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if self.swiglu else None
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), positions, mask, cache, self.layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        """seed: of the initial weights (see `init_weights`); None draws one from torch's global RNG."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed by layer index keeps parameter names stable when pipeline stages drop blocks.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if self.tok_emb.weight.device.type != "meta":  # on meta, the layout's materialize initializes
            self.init_weights(int(torch.randint(2**62, ())) if seed is None else seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Every parameter from `initial_value`."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, seed))

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GPT:
        """nn.Module's (memory for a model built on the meta device, values unset), keeping a tied embedding
        one tensor and recomputing the buffers no checkpoint holds."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings and self.tok_emb is not None and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight  # each module was given its own tensor: tie them again
        self.reset_buffers()
        return self

    def reset_buffers(self) -> None:
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset_buffers()

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """Parameter `name`'s initial value, whole and on the CPU, drawn from (seed, name) alone: a layout that
        shards or drops parameters takes its pieces of the same values, so every layout starts identical.

        MT-NLG init: N(0, sqrt(1/(3h))) everywhere, residual output projections scaled by 1/sqrt(2L); norm
        scales 1, biases 0."""
        shape = self.get_parameter(name).shape  # a DTensor's shape is the whole parameter's
        if self.cfg.tie_embeddings and name == "lm_head.weight":
            name = "tok_emb.weight"  # a pipeline's last stage holds a copy of the tied embedding
        if len(shape) == 1:
            return torch.ones(shape, device="cpu") if name.endswith("norm.weight") else torch.zeros(shape, device="cpu")
        std = self.cfg.init_std
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * self.cfg.n_layer)
        return torch.empty(shape, device="cpu").normal_(std=std, generator=seeded_generator(seed, name))

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        hidden: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab]. With a cache, tokens continue what it holds.
        last_only: logits of the last position only ([batch, 1, vocab]; with a cache, each row's last real
        token), all that sampling needs; the LM head of a long prompt would otherwise cost more than the rest
        of its forward. hidden: the final normed hidden states instead of logits (what embeddings pool). mask:
        [batch, 1, seq, seq] bool, True where a position may attend (packed examples: `document_mask`); default causal.

        A pipeline stage is this model with parts removed (set to None): without `tok_emb` the input is
        already hidden states [batch, seq, d_model], and without `lm_head` the hidden states come out."""
        T = tokens.size(1)
        if cache is not None:
            positions = cache.begin(T)  # each row continues its own sequence
        elif positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            positions = torch.arange(T, device=tokens.device)
        x = tokens
        if self.tok_emb is not None:
            x = self.tok_emb(tokens)
            if self.pos_emb is not None:
                x = x + self.pos_emb(positions)
            x = self.emb_dropout(x)
        if cache is not None:
            mask = cache.causal_mask()
        for block in self.blocks.values():
            x = block(x, positions, mask, cache)
        if last_only:
            x = cache.last(x) if cache is not None else x[:, -1:]
        if cache is not None:
            cache.advance()
        if self.lm_head is None:
            return x
        x = self.norm(x)
        return x if hidden else self.lm_head(x)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for the parameter `name`: its values depend on (seed, name) alone."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """The attention mask of rows packing several examples, each starting at position 0: causal, and within
    one example only. positions [batch, seq] -> [batch, 1, seq, seq] bool."""
    example = (positions == 0).cumsum(-1)
    same = example[:, :, None] == example[:, None, :]
    return torch.tril(same)[:, None]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Next-token loss in fp32: the sum over the targets (those equal to -100 skipped) divided by
    `denominator`, by default the number of targets (the mean when none is skipped). Targets arrive already
    shifted, so the logits are never copied, and the loss is summed over chunks of at most 2**23 logits:
    small temporaries keep the largest tensor of a step off the allocator's slow path (measured 12% faster
    for the loss on CPU, same result). Logits that fit one chunk skip the split, whose backward would write
    a second copy of their gradient."""
    logits, targets = logits.flatten(0, 1), targets.flatten()
    rows = max(1, 2**23 // logits.size(-1))
    if logits.size(0) <= rows:
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:
        total = sum(F.cross_entropy(x.float(), t, reduction="sum") for x, t in zip(logits.split(rows), targets.split(rows)))
    return total / (denominator or targets.numel())
