"""The cluster planner: memory checked against hand arithmetic, MT-NLG's published layout, errors as one line."""

import pytest

from mtnlg.cli import main
from mtnlg.config import ModelConfig
from mtnlg.errors import MtnlgError
from mtnlg.parallel.planner import GiB, format_plan, plan

SMALL = dict(vocab_size=1024, n_layer=4, n_head=4, d_model=256, max_seq_len=128)


def small_layouts(**kwargs):
    return plan(ModelConfig(**SMALL), gpus=8, gpu="a100-80g", global_batch=16, seq=128, **kwargs)


def pick(layouts, **want):
    found = [x for x in layouts if all(getattr(x, k) == v for k, v in want.items())]
    assert len(found) == 1, want
    return found[0]


def test_memory_by_hand():
    # gelu block with biases and two layernorms: 12 h^2 + 13 h parameters.
    h, vocab, positions, layers, heads = 256, 1024, 128, 4, 4
    block = 12 * h * h + 13 * h
    assert block == 789_760
    # pp=2: 2 layers per stage; first stage adds token + position embeddings (larger than the last stage's
    # final norm + tied head copy), divided over tp=2.
    tp, pp, micro_batch, seq = 2, 2, 2, 128
    first_end = vocab * h + positions * h
    last_end = 2 * h + vocab * h
    assert first_end > last_end
    params = (layers // pp * block + first_end) // tp
    assert params == 937_216
    # Korthikanti et al., no recompute, sequence parallel: s*b*h*(34 + 5*a*s/h) / t per layer,
    # x 2 layers x min(pp, micro-batches) in flight; dp = 8 / (2*2) = 2, micro-batches = 16 / (2*2) = 4.
    per_layer = seq * micro_batch * h * (34 + 5 * heads * seq / h) / tp
    assert per_layer == 1_441_792
    activations = per_layer * (layers // pp) * min(pp, 4)

    layout = pick(small_layouts(), tp=2, pp=2, micro_batch=2, recompute="none")
    assert layout.dp == 2 and layout.layers_per_stage == 2
    assert layout.params_per_gpu == params
    assert layout.weight_bytes == 2 * params
    assert layout.grad_bytes == 4 * params
    assert layout.optimizer_bytes == 12 * params
    assert layout.activation_bytes == activations == 5_767_168
    assert layout.bubble == pytest.approx((pp - 1) / 4)
    with_zero1 = pick(small_layouts(zero1=True), tp=2, pp=2, micro_batch=2, recompute="none")
    assert with_zero1.optimizer_bytes == 12 * params // 2


def test_recompute_trades_memory_for_time():
    layouts = small_layouts(tp=2, pp=2, micro_batch=2)
    none, selective, full = (pick(layouts, recompute=r) for r in ("none", "selective", "full"))
    assert full.activation_bytes < selective.activation_bytes < none.activation_bytes
    assert none.step_seconds < selective.step_seconds < full.step_seconds
    assert none.mfu > selective.mfu > full.mfu


def test_mt_nlg_layout_is_feasible_and_near_published_throughput(capsys):
    cfg = ModelConfig.from_name("mt-nlg-530b")
    layouts = plan(cfg, gpus=4480, gpu="a100-80g", global_batch=1920, seq=2048, tokens=270e9)
    assert capsys.readouterr() == ("", "")
    mtnlg = [x for x in layouts if (x.tp, x.pp, x.dp, x.micro_batch) == (8, 35, 16, 1)]
    assert {x.recompute for x in mtnlg} >= {"full"}
    for layout in mtnlg:
        assert layout.total_bytes < 80 * GiB
        assert 80 <= layout.tflops_per_gpu <= 200  # the paper: 113-126 TFLOP/s per A100
        assert 0 < layout.mfu < 1 and 1 < layout.days < 100
    assert "A100" in format_plan(layouts, "a100-80g")


def test_cli_lists_the_mt_nlg_layout(capsys):
    code = main(["plan", "--model", "mt-nlg-530b", "--gpus", "4480", "--gpu", "a100-80g", "--global-batch", "1920", "--seq", "2048"])
    out, err = capsys.readouterr()
    assert code == 0 and not err and "assumptions:" in out
    rows = [line.split() for line in out.splitlines()]
    assert any(row[:5] == ["8", "35", "16", "1", "full"] for row in rows), out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gpu="b200"), "unknown GPU 'b200'"),
        (dict(gpus=0), "--gpus must be positive"),
        (dict(gpus=64, global_batch=3), "no layout of 64 GPUs divides global batch 3"),
        (dict(seq=4096), "longer than the model's learned positions"),
    ],
)
def test_bad_input(kwargs, message):
    args = {**dict(gpus=8, gpu="a100-80g", global_batch=16, seq=128), **kwargs}
    with pytest.raises(MtnlgError, match=message):
        plan(ModelConfig(**SMALL), **args)


def test_nothing_fits_names_the_smallest():
    with pytest.raises(MtnlgError, match=r"the smallest needs [\d.]+ GiB per GPU .*use more GPUs"):
        plan(ModelConfig.from_name("mt-nlg-530b"), gpus=8, gpu="h200", global_batch=8, seq=2048)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope", "--gpus", "8", "--gpu", "h100"], "unknown model preset 'nope'"),
        (["--model", "gpt2", "--gpus", "8", "--gpu", "b200"], "unknown GPU"),
        (["--model", "gpt2", "--gpus", "-1", "--gpu", "h100"], "--gpus must be positive"),
        (["--model", "gpt2", "--gpus", "64", "--gpu", "h100", "--micro-batch", "3"], "divides global batch 16"),
    ],
)
def test_cli_errors_are_one_line(capsys, args, message):
    code = main(["plan", *args, "--global-batch", "16", "--seq", "1024"])
    out, err = capsys.readouterr()
    assert code != 0 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtnlg plan: error: ") and message in lines[0], err
