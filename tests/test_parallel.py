"""Parallel layouts: config validation and the pipeline split (single process), and parity with one process
on 2-4 gloo processes.

Each multi-process test trains a tiny model for 10 AdamW steps on the same global batches as a
single-process reference run here, and asserts equal losses and equal final (gathered) weights.
"""

from __future__ import annotations

import pytest
import torch

from mtnlg.config import Config, ModelConfig, ParallelConfig, TrainConfig, load_config
from mtnlg.errors import MtnlgError
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.pipeline import build_stage, stage_layers
from mtnlg.train.optim import build_optimizer, lr_at
from spawn import spawn

STEPS, BATCH, SEQ = 10, 4, 32
EVAL_AFTER = 4  # pipelines also evaluate batch 0 (forward only) after this step, then train on
TRAIN = dict(lr=1e-2, warmup_steps=2, max_steps=STEPS, weight_decay=0.1, grad_clip=1.0)


# -- configuration and layout checks (one process) ------------------------------------------------


def test_parallel_config_defaults_and_sections(tmp_path):
    cfg = Config()
    assert cfg.parallel == ParallelConfig() and cfg.parallel.world_size == 1
    assert Config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "run.toml"
    path.write_text('[parallel]\ntp = 2\nsequence_parallel = false\n')
    cfg = load_config(path, ["--parallel.dp_shard", "2", "--parallel.pp_schedule=gpipe"])
    assert (cfg.parallel.tp, cfg.parallel.dp_shard, cfg.parallel.sequence_parallel) == (2, 2, False)
    assert cfg.parallel.pp_schedule == "gpipe" and cfg.parallel.world_size == 4
    with pytest.raises(MtnlgError, match=r"sections are \[model\], \[train\], \[parallel\] and \[eval\]"):
        Config.from_dict({"paralel": {}})
    with pytest.raises(MtnlgError, match="did you mean parallel.dp_shard"):
        load_config(None, ["--parallel.dp_shards", "2"])
    with pytest.raises(MtnlgError, match="parallel.tp must be int"):
        load_config(None, ["--parallel.tp", "two"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=0), "parallel.tp must be a positive integer, got 0"),
        (dict(dp_shard=-1), "parallel.dp_shard must be a positive integer"),
        (dict(pp_schedule="zb"), "parallel.pp_schedule is 'zb'; choose one of: gpipe, 1f1b, interleaved-1f1b"),
        (dict(pp=2, microbatches=3), r"parallel.microbatches \(3\) must be a multiple of parallel.pp \(2\)"),
        (dict(activation_checkpointing="some"), "parallel.activation_checkpointing is 'some'; choose one of: none, selective, full"),
    ],
)
def test_invalid_parallel_config(kwargs, message):
    with pytest.raises(MtnlgError, match=message):
        ParallelConfig(**kwargs)


def test_world_size_mismatch():
    with pytest.raises(MtnlgError, match=r"tp 2 x pp 1 x dp_shard 2 x dp_replicate 1 = 4, but 2 processes are running"):
        ParallelDims(ParallelConfig(tp=2, dp_shard=2), world_size=2)
    with pytest.raises(MtnlgError, match="= 2, but 1 process is running"):
        ParallelDims(ParallelConfig(dp_replicate=2), world_size=1)
    with pytest.raises(MtnlgError, match=r"parallel.dp_replicate \(2\) with parallel.tp \(2\) needs parallel.dp_shard > 1"):
        ParallelDims(ParallelConfig(tp=2, dp_replicate=2), world_size=4)


@pytest.mark.parametrize(
    "layout, model, message",
    [
        (dict(tp=3), dict(), r"model.n_head \(4\) is not divisible by parallel.tp \(3\)"),
        (dict(tp=4), dict(n_kv_head=2), r"model.n_kv_head \(2\) is not divisible by parallel.tp \(4\)"),
        (dict(tp=2), dict(vocab_size=511), r"model.vocab_size \(511\) is not divisible by parallel.tp \(2\).*pad model.vocab_size to 512"),
        (dict(tp=2), dict(d_ff=255), r"model.d_ff \(255\) is not divisible by parallel.tp \(2\)"),
        (dict(pp=4, microbatches=4), dict(), r"model.n_layer \(2\) is fewer than the 4 pipeline stages of parallel.pp 4"),
        (dict(pp=2, microbatches=2, pp_schedule="interleaved-1f1b"), dict(), r"model.n_layer \(2\) is fewer than the 4 pipeline stages"),
    ],
)
def test_model_does_not_split(layout, model, message):
    dims = ParallelDims(ParallelConfig(**layout), world_size=ParallelConfig(**layout).world_size)
    with pytest.raises(MtnlgError, match=message):
        dims.validate_model(ModelConfig.from_name("tiny", **model))


def test_sequence_and_batch_must_split():
    dims = ParallelDims(ParallelConfig(tp=2, dp_shard=2, dp_replicate=2), world_size=8)
    with pytest.raises(MtnlgError, match="sequence length 33 is not divisible by parallel.tp"):
        dims.validate_model(ModelConfig.from_name("tiny"), seq_len=33)
    with pytest.raises(MtnlgError, match=r"global_batch_size \(6\) is not divisible by the 4 data-parallel ranks"):
        dims.validate_batch(6)
    with pytest.raises(MtnlgError, match="each data-parallel rank gets 2 samples"):
        dims.validate_batch(8, micro_batch_size=4)


def test_rank_layout():
    dims = ParallelDims(ParallelConfig(tp=2, dp_shard=2, dp_replicate=2), world_size=8)
    assert dims.coordinates(5) == {"dp_replicate": 1, "dp_shard": 0, "pp": 0, "tp": 1}
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # tp partners share a slice
    assert dims.batch_slice(8, 6) == slice(6, 8)


# -- the pipeline split (one process) ------------------------------------------------------------


def test_stage_layers_are_contiguous_and_balanced():
    assert stage_layers(5, 2, "1f1b") == [range(0, 3), range(3, 5)]  # earlier stages take the extra block
    assert stage_layers(4, 2, "interleaved-1f1b") == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert stage_layers(7, 3, "gpipe") == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(MtnlgError, match=r"model.n_layer \(2\) is fewer than the 4 pipeline stages of parallel.pp 2 "
                       "with interleaved-1f1b.*or another parallel.pp_schedule"):
        stage_layers(2, 2, "interleaved-1f1b")
    with pytest.raises(MtnlgError, match=r"model.n_layer \(2\) is fewer than the 3 pipeline stages"):
        stage_layers(2, 3, "gpipe")


@pytest.mark.parametrize("model_name", ["tiny", "llama-tiny"])
def test_stages_compose_to_the_whole_model(model_name):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(model_name, n_layer=3))
    layers = stage_layers(3, 2, "gpipe")
    first, last = build_stage(model, layers[0], True, False), build_stage(model, layers[1], False, True)
    assert list(first.blocks) == ["0", "1"] and list(last.blocks) == ["2"]
    assert first.tok_emb is not None and first.norm is None and first.lm_head is None
    assert last.tok_emb is None and last.pos_emb is None and last.norm is not None and last.lm_head is not None
    assert (first.pos_emb is not None) == (model_name == "tiny")
    names = {k for stage in (first, last) for k, _ in stage.named_parameters()}
    # the whole model's names; with tied embeddings the last stage's head holds a copy of tok_emb.weight
    assert names == {k for k, _ in model.named_parameters()} | {"lm_head.weight"}
    if model.cfg.tie_embeddings:
        assert torch.equal(last.lm_head.weight, model.tok_emb.weight)
    tokens = torch.randint(0, 512, (2, 8))
    positions = torch.arange(8)
    hidden = first(tokens, positions)
    assert hidden.shape == (2, 8, model.cfg.d_model)
    torch.testing.assert_close(last(hidden, positions), model(tokens), rtol=0, atol=0)


def test_whole_model_with_pipeline_layout_is_refused():
    from mtnlg.parallel.parallelize import parallelize

    dims = ParallelDims(ParallelConfig(pp=2, microbatches=2), world_size=2)
    with pytest.raises(MtnlgError, match="parallel.pp is 2: build the model with mtnlg.parallel.pipeline.Pipeline"):
        parallelize(GPT(ModelConfig.from_name("tiny")), dims, mesh=None)


# -- parity with one process (2 and 4 gloo processes) ---------------------------------------------


def _batches(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, min(vocab, 32), (STEPS, BATCH, SEQ + 1), generator=g)  # learnable: few tokens used


def _model_config(model: str) -> ModelConfig:
    """A preset name, optionally with a layer count: "tiny" or "tiny:4"."""
    name, _, n_layer = model.partition(":")
    return ModelConfig.from_name(name, **({"n_layer": int(n_layer)} if n_layer else {}))


def _reference(model_name: str):
    torch.manual_seed(0)
    model = GPT(_model_config(model_name))
    tc = TrainConfig(**TRAIN)
    opt = build_optimizer(model, tc)
    losses, batches = [], _batches(model.cfg.vocab_size)
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == EVAL_AFTER:
            with torch.no_grad():
                eval_loss = cross_entropy(model(batches[0, :, :-1]), batches[0, :, 1:])
    return losses, eval_loss.item(), {k: v.detach().clone() for k, v in model.named_parameters()}


def _worker(rank: int, world: int, layout: dict, model_name: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mtnlg.parallel.parallelize import clip_grad_norm_, loss_context, parallel_loss, parallelize
    from mtnlg.parallel.pipeline import Pipeline

    dist.init_process_group("gloo")
    dims = ParallelDims(ParallelConfig(**layout), world)
    mesh = dims.build_mesh("cpu")
    torch.manual_seed(0)  # same init on every rank, before sharding
    model = GPT(_model_config(model_name))
    pipeline = Pipeline(model, dims, mesh) if dims.pp > 1 else None
    modules = pipeline.stages if pipeline else [parallelize(model, dims, mesh)]
    tc = TrainConfig(**TRAIN)
    opt = build_optimizer(pipeline.parameters() if pipeline else model, tc)
    rows = dims.batch_slice(BATCH, rank)
    if pipeline:  # a batch that does not cut into the micro-batches is refused before any communication
        with pytest.raises(MtnlgError, match=r"batch of 1 samples does not split into parallel.microbatches"):
            pipeline.step(torch.zeros(1, SEQ, dtype=torch.long), torch.zeros(1, SEQ, dtype=torch.long))
    losses, eval_loss = [], None
    for step, batch in enumerate(_batches(model.cfg.vocab_size)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        batch = batch[rows]
        if pipeline:
            loss = pipeline.step(batch[:, :-1], batch[:, 1:])  # every pipeline rank gets its batch's loss
            pipeline.clip_grad_norm_(tc.grad_clip)
        else:
            logits = model(batch[:, :-1])
            with loss_context(logits):
                loss = parallel_loss(logits, batch[:, 1:])
                loss.backward()
            clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach().clone()
        dist.all_reduce(mean)  # every tp/pp rank holds its slice's loss: the mean over ranks is the dp mean
        losses.append(mean.item() / world)
        if pipeline and step == EVAL_AFTER:
            first = _batches(model.cfg.vocab_size)[0, rows]
            mean = pipeline.evaluate(first[:, :-1], first[:, 1:])
            dist.all_reduce(mean)
            eval_loss = mean.item() / world
    weights = {  # this rank's stage(s), or the whole model
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for module in modules
        for k, v in module.named_parameters()
    }
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(weights, gathered, dst=0)
    if rank == 0:
        weights = {k: v for w in gathered for k, v in w.items()}
        torch.save({"losses": losses, "eval_loss": eval_loss, "weights": weights}, out)


_REFERENCES: dict[str, tuple] = {}


def _check_parity(tmp_path, layout: dict, model_name: str = "tiny") -> None:
    world = ParallelConfig(**layout).world_size
    out = str(tmp_path / "result.pt")
    spawn(_worker, world, world, layout, model_name, out)
    got = torch.load(out)
    if model_name not in _REFERENCES:
        _REFERENCES[model_name] = _reference(model_name)
    ref_losses, ref_eval_loss, ref_weights = _REFERENCES[model_name]
    if "lm_head.weight" not in ref_weights and "lm_head.weight" in got["weights"]:
        # a pipeline's last stage holds the tied embedding as lm_head.weight: it must stay equal to tok_emb
        assert torch.equal(got["weights"].pop("lm_head.weight"), got["weights"]["tok_emb.weight"])
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref_losses))
    # The key bias gets an exactly-zero gradient in exact arithmetic (it shifts every score of a query by
    # the same amount), so AdamW turns float rounding noise into full-size steps: not comparable.
    weight_diff = max(
        (got["weights"][k] - v).abs().max().item() for k, v in ref_weights.items() if not k.endswith("k_proj.bias")
    )
    print(f"{layout} {model_name}: max relative loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert set(got["weights"]) == set(ref_weights)
    assert loss_diff < 1e-5, (got["losses"], ref_losses)
    if got["eval_loss"] is not None:
        assert abs(got["eval_loss"] - ref_eval_loss) / ref_eval_loss < 1e-5, (got["eval_loss"], ref_eval_loss)
    assert weight_diff < 1e-4
    assert ref_losses[-1] < ref_losses[0]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny", "llama-tiny"])
def test_tensor_parallel_matches_one_process(tmp_path, model_name):
    _check_parity(tmp_path, dict(tp=2, sequence_parallel=True), model_name)


@pytest.mark.slow
def test_tensor_parallel_without_sequence_parallel(tmp_path):
    _check_parity(tmp_path, dict(tp=2, sequence_parallel=False), "llama-tiny")


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [dict(dp_replicate=2), dict(dp_shard=2), dict(dp_replicate=2, dp_shard=2)], ids=["ddp", "fsdp", "hsdp"]
)
def test_data_parallel_matches_one_process(tmp_path, layout):
    _check_parity(tmp_path, layout)


@pytest.mark.slow
def test_tensor_parallel_with_fsdp_on_four_processes(tmp_path):
    _check_parity(tmp_path, dict(tp=2, dp_shard=2), "tiny")  # tied embeddings + learned positions + biases


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, model_name",
    [("gpipe", "tiny"), ("1f1b", "tiny"), ("interleaved-1f1b", "tiny:4")],  # interleaved: 2 stages per rank
)
def test_pipeline_matches_one_process(tmp_path, schedule, model_name):
    _check_parity(tmp_path, dict(pp=2, pp_schedule=schedule, microbatches=4), model_name)


@pytest.mark.slow
@pytest.mark.parametrize("dp", [dict(dp_shard=2), dict(dp_replicate=2)], ids=["fsdp", "ddp"])
def test_pipeline_with_data_parallel_on_four_processes(tmp_path, dp):
    _check_parity(tmp_path, dict(pp=2, microbatches=2, **dp), "tiny")


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, model_name",
    [("1f1b", "llama-tiny"), ("interleaved-1f1b", "tiny:4")],  # rotary positions; tied vocab-parallel embedding
)
def test_pipeline_with_tensor_parallel_on_four_processes(tmp_path, schedule, model_name):
    # sequence parallel: each tp rank sends its sequence shard to the next stage
    _check_parity(tmp_path, dict(tp=2, pp=2, pp_schedule=schedule, microbatches=2), model_name)
