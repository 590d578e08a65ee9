import math
import os

import pytest
import torch

from mtnlg.config import PRESETS, ModelConfig
from mtnlg.model.flops import model_size
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.model.kv_cache import KVCache


@pytest.mark.parametrize("name", [n for n in PRESETS if model_size(ModelConfig.from_name(n)).params < 2e9])
def test_param_count_matches_the_module(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model_size(cfg).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "bias": False}, {"n_kv_head": 1, "mlp": "swiglu"}])
def test_param_count_matches_for_variants(overrides):
    cfg = ModelConfig.from_name("llama-tiny", **overrides) if "mlp" in overrides else ModelConfig.from_name("tiny", **overrides)
    assert model_size(cfg).params == sum(p.numel() for p in GPT(cfg).parameters())


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = ModelConfig.from_name("gpt2")
    size = model_size(cfg, seq_len=1024)
    matmul = 12 * 12 * 768**2 + 50304 * 768  # per-layer 12h^2 weights plus the LM head
    assert size.matmul_params == matmul
    assert size.flops_per_token == 6 * matmul + 12 * 12 * 1024 * 768


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_causal_future_tokens_do_not_change_past_logits(name):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(name)).eval()
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 512, (2, 6))
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_kv_cache_decoding_matches_full_forward(name):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(name)).eval()
    x = torch.randint(0, 512, (2, 20))
    full = model(x)
    cache = KVCache(model.cfg, 2, 20, "cpu", torch.float32)
    pieces = [model(x[:, :7], cache=cache), model(x[:, 7:12], cache=cache)]
    pieces += [model(x[:, i : i + 1], cache=cache) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    cache = KVCache(model.cfg, 2, 20, "cpu", torch.float32)
    last = model(x[:, :12], cache=cache, last_only=True)  # what sampling asks of a prompt
    assert last.shape == (2, 1, model.cfg.vocab_size)
    torch.testing.assert_close(last, full[:, 11:12], atol=1e-5, rtol=1e-5)


def test_mt_nlg_init_scales_residual_projections():
    cfg = ModelConfig(vocab_size=256, n_layer=8, n_head=4, d_model=256, max_seq_len=32)
    model = GPT(cfg)
    std = math.sqrt(1 / (3 * 256))
    assert model.blocks["0"].attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.blocks["0"].mlp.down_proj.weight.std().item() == pytest.approx(std / math.sqrt(16), rel=0.05)
    block = model.blocks["0"]
    assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn_norm.bias == 0)
    assert torch.all(block.attn.q_proj.bias == 0) and torch.all(model.norm.bias == 0)


def test_tied_head_shares_the_embedding():
    tied, untied = GPT(ModelConfig.from_name("tiny")), GPT(ModelConfig.from_name("tiny", tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


def _grads(model, x):
    model.zero_grad()
    cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
    return [p.grad.clone() for p in model.parameters()]


def _ops_in_backward(model: GPT, x: torch.Tensor) -> dict[str, int]:
    """How many matmuls and layer norms the backward pass really runs (recompute shows up here; an
    output that selective recompute kept is served from memory and never reaches this counter)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"matmul": 0, "norm": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts["matmul"] += name in ("mm", "addmm")
            counts["norm"] += name == "native_layer_norm"
            return func(*args, **(kwargs or {}))

    loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
    with Count():
        loss.backward()
    return counts


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_activation_checkpointing_recomputes_what_it_says_with_the_same_gradients(name):
    from mtnlg.parallel.parallelize import apply_ac

    x = torch.randint(0, 512, (2, 33))
    ops = {}
    for mode in ("none", "selective", "full"):
        model = GPT(ModelConfig.from_name(name, dropout=0.1, norm="layernorm"), seed=0)
        if mode != "none":
            apply_ac(model, mode)  # from outside, as the layout applies it
        torch.manual_seed(1)  # the same dropout masks, which recompute must redraw identically
        grads = _grads(model, x)
        if mode == "none":
            plain = grads
        for a, b in zip(plain, grads):
            torch.testing.assert_close(a, b)
        torch.manual_seed(1)
        ops[mode] = _ops_in_backward(model, x)
    # selective reruns the norms but takes the matmuls from memory; full reruns both
    assert ops["none"]["norm"] == 0 and ops["selective"]["norm"] > 0 and ops["full"]["norm"] > 0
    assert ops["none"]["matmul"] == ops["selective"]["matmul"] < ops["full"]["matmul"]


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny", dropout=0.5))
    x = torch.randint(0, 512, (1, 8))
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_overlong_input_is_refused():
    model = GPT(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="exceeds max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("ATEN_CPU_CAPABILITY")), reason="with ATen's ISA capped below the host's, "
                    "Inductor's vectorized code miscomputes this training-mode graph (torch 2.13; docs/benchmarks.md)")
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny")).eval()
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)
