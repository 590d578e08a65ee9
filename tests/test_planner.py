"""The cluster planner: memory checked against hand arithmetic, MT-NLG's published layout, errors as one line."""

import pytest

from mtnlg.cli import main
from mtnlg.config import ModelConfig, ParallelConfig
from mtnlg.errors import MtnlgError
from mtnlg.model.flops import TRAINING_BYTES_PER_PARAM, block_params, model_size
from mtnlg.parallel.layout import ParallelDims, stage_layers
from mtnlg.parallel.planner import GiB, format_plan, plan, rank_params, rank_state_bytes

SMALL = dict(vocab_size=1024, n_layer=4, n_head=4, d_model=256, max_seq_len=128)


def small_layouts(**kwargs):
    return plan(ModelConfig(**SMALL), gpus=8, gpu="a100-80g", global_batch=16, seq=128, **kwargs)


def pick(layouts, **want):
    found = [x for x in layouts if all(getattr(x, k) == v for k, v in want.items())]
    assert len(found) == 1, want
    return found[0]


def test_memory_by_hand():
    # gelu block with biases and two layernorms: 12 h^2 + 13 h parameters. On each of tp ranks the q/k/v/up
    # weights and biases (12 h^2 + 7 h) are cut; the o/down biases and the norms (6 h) stay whole.
    h, vocab, positions, layers, heads = 256, 1024, 128, 4, 4
    tp, pp, micro_batch, seq = 2, 2, 2, 128
    assert 12 * h * h + 13 * h == block_params(ModelConfig(**SMALL)) == 789_760
    block = (12 * h * h + 7 * h) // tp + 6 * h
    # pp=2: 2 blocks per stage; the first stage adds the vocabulary-parallel token embedding and the whole
    # position embedding, the last the final norm and the tied head's copy, cut like the embedding.
    first = layers // pp * block + vocab * h // tp + positions * h
    last = layers // pp * block + 2 * h + vocab * h // tp
    assert [rank_params(ModelConfig(**SMALL), tp, pp, r) for r in range(pp)] == [first, last] == [955_136, 922_880]
    # Korthikanti et al., no recompute, sequence parallel: s*b*h*(34 + 5*a*s/h) / t per layer,
    # x 2 layers x min(pp, micro-batches) in flight; dp = 8 / (2*2) = 2, micro-batches = 16 / (2*2) = 4.
    per_layer = seq * micro_batch * h * (34 + 5 * heads * seq / h) / tp
    assert per_layer == 1_441_792
    activations = per_layer * (layers // pp) * min(pp, 4)

    layout = pick(small_layouts(), tp=2, pp=2, micro_batch=2, recompute="none")
    assert layout.dp == 2 and layout.layers_per_stage == 2
    assert layout.params_per_gpu == first  # the fuller pipeline rank
    assert layout.weight_bytes == 2 * first
    assert layout.grad_bytes == 4 * first
    assert layout.optimizer_bytes == 12 * first
    assert layout.activation_bytes == activations == 5_767_168
    assert layout.bubble == pytest.approx((pp - 1) / 4)
    with_zero1 = pick(small_layouts(zero1=True), tp=2, pp=2, micro_batch=2, recompute="none")
    assert with_zero1.optimizer_bytes == 12 * first // 2


def test_pipeline_sizes_are_the_runtimes():
    # 105 layers (MT-NLG's depth, narrowed so that everything fits): the runtime splits them over any pp up
    # to 105, e.g. 13, 16, 17, 19, 20 (stages of 6 and 5 blocks for pp 20), so the planner offers them too.
    cfg = ModelConfig.from_name("mt-nlg-530b", d_model=512, n_head=8)
    gpus = 8 * 13 * 16 * 17 * 19 * 5
    layouts = plan(cfg, gpus=gpus, gpu="h100", global_batch=gpus, seq=2048, tp=8, micro_batch=1)
    runtime = set()
    for p in (p for p in range(1, gpus // 8 + 1) if gpus % (8 * p) == 0):
        dims = ParallelDims(ParallelConfig(tp=8, pp=p, dp_shard=gpus // (8 * p), microbatches=p), gpus)
        try:
            dims.validate_model(cfg)
        except MtnlgError:
            continue
        runtime.add(p)
    assert {x.pp for x in layouts} == runtime
    assert {13, 16, 17, 19, 20, 104} <= runtime and max(runtime) == 104


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
        (dict(pp=8), r"model.n_layer \(4\) is fewer than the 8 pipeline stages"),
        (dict(tp=8), r"model.n_head \(4\) is not divisible by parallel.tp \(8\)"),
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


@pytest.fixture
def tp_group():
    """A 2-rank tensor-parallel mesh on PyTorch's fake process group: this process builds rank 0's shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    dist.destroy_process_group()


@pytest.mark.parametrize("name, overrides", [
    ("gpt2", dict(vocab_size=256, n_layer=5, n_head=4, d_model=64, max_seq_len=32)),  # tied, biases, learned
    ("llama-tiny", dict(n_layer=5)),  # untied, no biases, rotary, swiglu, grouped-query attention
    ("llama-tiny", dict(n_layer=5, tie_embeddings=True)),
    ("llama-tiny", dict(n_layer=5, qkv_bias=True)),  # Qwen2: biases on q, k and v, cut with them
    ("llama-tiny", dict(n_layer=5, qk_norm=True)),  # Qwen3: per-head norms, whole on every tp rank
])
@pytest.mark.parametrize("pp, schedule", [(1, "1f1b"), (2, "1f1b"), (3, "1f1b"), (2, "interleaved-1f1b")])
def test_rank_params_are_the_runtimes(tp_group, name, overrides, pp, schedule):
    """Each pipeline rank's stages, cut by the real pipeline split and tensor-parallel plan, hold exactly
    rank_params; the tied head's copy on the last stage counts there."""
    from mtnlg.model.gpt import GPT
    from mtnlg.parallel.parallelize import apply_tp
    from mtnlg.parallel.pipeline import build_stage

    cfg = ModelConfig.from_name(name, **overrides)
    model = GPT(cfg)
    stages = stage_layers(cfg.n_layer, pp, schedule) if pp > 1 else [range(cfg.n_layer)]
    for rank in range(pp):
        mine = [build_stage(model, stages[s], s == 0, s == len(stages) - 1) for s in range(rank, len(stages), pp)]
        assert sum(p.numel() for stage in mine for p in stage.parameters()) == rank_params(cfg, 1, pp, rank, schedule)
        for stage in mine:
            apply_tp(stage, tp_group, sequence_parallel=True)
        local = sum(p.to_local().numel() for stage in mine for p in stage.parameters())
        assert local == rank_params(cfg, 2, pp, rank, schedule), (rank, local)
    assert rank_params(cfg, 1, 1, 0) == model_size(cfg).params


def test_rank_state_bytes():
    cfg = ModelConfig(**SMALL)
    params = rank_params(cfg, 2, 2, 0)
    state = rank_state_bytes(cfg, 2, 2, 0)
    assert list(state) == list(TRAINING_BYTES_PER_PARAM) and sum(state.values()) == 18 * params
    assert rank_state_bytes(cfg, 2, 2, 0, dp_shard=4) == {k: v // 4 for k, v in state.items()}
    with pytest.raises(MtnlgError, match="pipeline rank 2 is outside pp 2"):
        rank_params(cfg, 2, 2, 2)
    with pytest.raises(MtnlgError, match=r"model.n_head \(4\) is not divisible by parallel.tp \(8\)"):
        rank_params(cfg, 8, 1, 0)



@pytest.mark.slow
def test_dry_run_of_the_mt_nlg_layout_agrees_with_the_planner(capsys):
    """MT-NLG's own layout, built for real as three of 4,480 ranks on the fake process group: each rank's
    parameters, weights, gradients and optimizer state as the planner counts them, and its traffic."""
    from mtnlg.cli import main

    assert main(["plan", "--model", "mt-nlg-530b", "--gpus", "4480", "--gpu", "a100-80g", "--global-batch", "1920",
                 "--seq", "2048", "--check"]) == 0
    out = capsys.readouterr().out
    assert "dry run of tp=8, pp=35, dp=16 (micro-batch 1, 120 per step" in out
    assert "as ranks 0, 136, 272 of 4480" in out
    assert "rank 136 (dp_replicate 0, dp_shard 0, pp 17, tp 0; stage 17, blocks 51-53): 1,887,859,200 parameters" in out
    assert out.count("(0.00% apart)") == 3 and "within 1% of the planner's" in out
    assert "tp reduce_scatter_tensor" in out and "dp all_reduce" in out and "pp send" in out


def test_dry_run_of_fully_sharded_and_interleaved_ranks():
    """FSDP shards (padded where uneven) and two interleaved stages per rank, against the planner's arithmetic."""
    from mtnlg.config import Config, ParallelConfig, TrainConfig
    from mtnlg.parallel.dryrun import dry_run
    from mtnlg.parallel.planner import rank_state_bytes

    model = ModelConfig.from_name("llama-tiny", n_layer=8)
    layout = ParallelConfig(tp=2, pp=2, dp_shard=4, microbatches=2, pp_schedule="interleaved-1f1b")
    config = Config(model=model, train=TrainConfig(micro_batch_size=1, global_batch_size=8), parallel=layout)
    reports = dry_run(config, 16, [0, 2], seq=64)
    assert [r.stages for r in reports] == [[0, 2], [1, 3]]
    for r in reports:
        want = rank_state_bytes(model, 2, 2, r.coordinates["pp"], "interleaved-1f1b", dp_shard=4)
        assert r.total_state_bytes == pytest.approx(sum(want.values()), rel=0.01)
        assert {"dp all_gather_into_tensor", "dp reduce_scatter_tensor", "pp send"} <= set(r.collectives)
