"""Parallel layouts: config validation and the pipeline split (single process), and parity with one process
on 2-4 gloo processes.

Each multi-process test runs the real Trainer for 6 AdamW steps on the same global batches as a
single-process Trainer run here, and asserts bit-identical initial weights, equal losses and validation
losses, and equal final weights.
"""

from __future__ import annotations

import math

import pytest
import torch

import safetensors.torch

from mtnlg.checkpoint import find_latest, tensor_reader
from mtnlg.config import Config, ModelConfig, ParallelConfig, load_config
from mtnlg.errors import MtnlgError
from mtnlg.finetune.lora import is_adapter
from mtnlg.model.gpt import GPT
from mtnlg.parallel.layout import ParallelDims, stage_layers
from mtnlg.parallel.pipeline import build_stage
from mtnlg.train.metrics import read_metrics
from mtnlg.train.trainer import Trainer
from spawn import spawn


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
    with pytest.raises(MtnlgError, match=r"sections are \[model\], \[train\], \[parallel\], \[eval\], \[finetune\] and"):
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
        (dict(activation_checkpointing="some"), "parallel.activation_checkpointing is 'some'; choose one of: none, selective, full"),
    ],
)
def test_invalid_parallel_config(kwargs, message):
    with pytest.raises(MtnlgError, match=message):
        ParallelConfig(**kwargs)


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(pp=4, microbatches=3), r"parallel.microbatches \(3\) is fewer than the 4 pipeline stages, which 1f1b needs"),
        (dict(pp=4, microbatches=11, pp_schedule="interleaved-1f1b"), r"does not split into 2 equal rounds"),
    ],
)
def test_microbatches_the_schedules_refuse(layout, message):
    with pytest.raises(MtnlgError, match=message):
        ParallelDims(ParallelConfig(**layout), world_size=4)
    ParallelDims(ParallelConfig(**{**layout, "pp_schedule": "gpipe", "microbatches": 3}), world_size=4)
    ParallelDims(ParallelConfig(pp=35, microbatches=120), world_size=35)  # MT-NLG: 120 micro-batches on 35 stages


def test_world_size_mismatch():
    with pytest.raises(MtnlgError, match=r"tp 2 x pp 1 x dp_shard 2 x dp_replicate 1 = 4, but 2 processes are running"):
        ParallelDims(ParallelConfig(tp=2, dp_shard=2), world_size=2)
    with pytest.raises(MtnlgError, match="= 2, but 1 process is running"):
        ParallelDims(ParallelConfig(dp_replicate=2), world_size=1)


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
    from mtnlg.hardware import Precision
    from mtnlg.parallel.parallelize import parallelize

    dims = ParallelDims(ParallelConfig(pp=2, microbatches=2), world_size=2)
    with pytest.raises(MtnlgError, match="parallel.pp is 2: build the model with mtnlg.parallel.pipeline.Pipeline"):
        parallelize(GPT(ModelConfig.from_name("tiny")), dims, None, Precision.for_training("fp32", torch.device("cpu")))


# -- parity with one process (2 and 4 gloo processes), through the real Trainer ---------------------


def _parity_config(tiny_config, run_dir, layout: dict, model: str, *extra: str):
    """6 AdamW steps of 4 samples, evaluated at steps 3 and 6. The micro-batch is one sample, so a pipeline
    runs a data-parallel rank's slice as that many micro-batches; model is a preset, then optionally a layer
    count and switches to turn on: "tiny", "tiny:4", "llama-tiny+qkv_bias+qk_norm"."""
    name, *switches = model.split("+")
    name, _, n_layer = name.partition(":")
    per_rank = 4 // (layout.get("dp_shard", 1) * layout.get("dp_replicate", 1))
    return tiny_config(
        f"--model.preset={name}", *([f"--model.n_layer={n_layer}"] if n_layer else []),
        *(f"--model.{switch}=true" for switch in switches),
        "--train.max_steps=6", "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.lr=1e-2",
        "--train.warmup_steps=2", "--train.weight_decay=0.1", "--train.grad_clip=1.0", "--train.eval_interval=3",
        "--train.eval_batches=1", "--train.save_interval=0", "--train.log_interval=1",
        *(f"--parallel.{k}={v}" for k, v in layout.items()), f"--parallel.microbatches={per_rank}", *extra,
        out_dir=run_dir,
    )


def _full_weights(modules) -> dict[str, torch.Tensor]:
    """The whole value of every parameter this rank holds (a collective over its tp/dp peers for DTensors)."""
    from mtnlg.parallel import whole

    return {k: whole(v).detach().clone() for m in modules for k, v in m.named_parameters()}


def _train_recording_initial_weights(rank: int, config, out: str) -> None:
    import torch.distributed as dist

    trainer = Trainer(config)
    initial = _full_weights(trainer.parts.modules)
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(initial, gathered, dst=0)
    if rank == 0:
        torch.save({k: v for w in gathered for k, v in w.items()}, out)
    trainer.fit()


def _results(run_dir, initial: dict) -> dict:
    records = read_metrics(run_dir)
    final = find_latest(run_dir / "checkpoints")
    if (final / "model.safetensors").is_file():
        weights = safetensors.torch.load_file(final / "model.safetensors")
    else:  # a LoRA run's checkpoint: its adapters
        read = tensor_reader(final)
        weights = {name: read(name) for name in initial if is_adapter(name)}
    return {
        "losses": {r["step"]: r["loss"] for r in records if "loss" in r},
        "val": {r["step"]: r["val_loss"] for r in records if "val_loss" in r},
        "initial": initial,
        "weights": weights,
    }


_REFERENCES: dict[str, dict] = {}


def _reference(tiny_config, tmp_path_factory, model: str, extra: tuple[str, ...]) -> dict:
    if (model, extra) not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp("reference")
        trainer = Trainer(_parity_config(tiny_config, run_dir, {}, model, *extra))
        initial = _full_weights(trainer.parts.modules)
        trainer.fit()
        _REFERENCES[model, extra] = _results(run_dir, initial)
    return _REFERENCES[model, extra]


def _check_parity(tiny_config, tmp_path, tmp_path_factory, layout: dict, model: str = "tiny", val_rtol: float = 1e-5,
                  weight_atol: float = 3e-4, extra: tuple[str, ...] = ()):
    """The layout's losses, validation losses and final weights against one process's; its initial weights
    bit for bit. `extra`: further overrides of both runs."""
    world = math.prod(layout.get(k, 1) for k in ("tp", "pp", "dp_shard", "dp_replicate"))
    run_dir = tmp_path / "run"
    spawn(_train_recording_initial_weights, world, _parity_config(tiny_config, run_dir, layout, model, *extra),
          str(tmp_path / "initial.pt"))
    got = _results(run_dir, torch.load(tmp_path / "initial.pt"))
    want = _reference(tiny_config, tmp_path_factory, model, extra)
    if "lm_head.weight" in got["initial"] and "lm_head.weight" not in want["initial"]:
        # a pipeline's last stage holds the tied embedding as lm_head.weight: it starts as the embedding
        assert torch.equal(got["initial"].pop("lm_head.weight"), got["initial"]["tok_emb.weight"])
    assert got["initial"].keys() == want["initial"].keys()
    assert all(torch.equal(got["initial"][k], v) for k, v in want["initial"].items())
    loss_diff = max(abs(got["losses"][s] - v) / v for s, v in want["losses"].items())
    val_diff = max(abs(got["val"][s] - v) / v for s, v in want["val"].items())
    # The key bias gets an exactly-zero gradient in exact arithmetic (it shifts every score of a query by
    # the same amount), so AdamW turns float rounding noise into full-size steps: not comparable. Elsewhere
    # AdamW's normalized steps grow small gradients' rounding noise too: up to 1.6e-4 after 10 such steps
    # on an AVX-512 CPU (Zen 4), under 1e-4 on AVX2.
    weight_diff = max(
        (got["weights"][k] - v).abs().max().item() for k, v in want["weights"].items() if not k.endswith("k_proj.bias")
    )
    print(f"{layout} {model}: relative loss diff {loss_diff:.1e}, validation {val_diff:.1e}, weights {weight_diff:.1e}")
    assert got["losses"].keys() == want["losses"].keys() == set(range(1, 7)) and got["val"].keys() == {3, 6}
    assert loss_diff < 1e-5 and val_diff < val_rtol and weight_diff < weight_atol
    assert want["losses"][6] < want["losses"][1]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny", "llama-tiny"])
def test_tensor_parallel_matches_one_process(tiny_config, tmp_path, tmp_path_factory, model_name):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(tp=2, sequence_parallel=True), model_name, val_rtol=1e-6)


@pytest.mark.slow
def test_tensor_parallel_with_qwen_biases_and_head_norms(tiny_config, tmp_path, tmp_path_factory):
    """Qwen2's q/k/v biases cut with their projections; Qwen3's per-head norms whole on every rank, their
    gradients summed over the heads the ranks hold."""
    # Losses agree to 2e-7; AdamW's steps on near-zero gradients amplify rounding in the MLP weights to 1.1e-4.
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(tp=2), "llama-tiny+qkv_bias+qk_norm", val_rtol=1e-6,
                  weight_atol=2e-4)


@pytest.mark.slow
def test_tensor_parallel_without_sequence_parallel(tiny_config, tmp_path, tmp_path_factory):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(tp=2, sequence_parallel=False), "llama-tiny")


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [dict(dp_replicate=2), dict(dp_shard=2), dict(dp_replicate=2, dp_shard=2)], ids=["ddp", "fsdp", "hsdp"]
)
def test_data_parallel_matches_one_process(tiny_config, tmp_path, tmp_path_factory, layout):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, layout, val_rtol=1e-6)


@pytest.mark.slow
def test_tensor_parallel_with_replicas_on_four_processes(tiny_config, tmp_path, tmp_path_factory):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(tp=2, dp_replicate=2), "llama-tiny")


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [dict(tp=2, dp_shard=2, activation_checkpointing="selective"), dict(pp=2, activation_checkpointing="full")],
    ids=["tp-fsdp-selective", "pp-full"],
)
def test_activation_checkpointing_under_parallel_layouts(tiny_config, tmp_path, tmp_path_factory, layout):
    """Recompute applied from outside, with the tensor-parallel collectives it keeps, FSDP's gathers and the
    pipeline's stages: the numbers of one process without it."""
    _check_parity(tiny_config, tmp_path, tmp_path_factory, layout, "tiny")


@pytest.mark.slow
def test_tensor_parallel_with_fsdp_on_four_processes(tiny_config, tmp_path, tmp_path_factory):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(tp=2, dp_shard=2), "tiny")  # tied embeddings + learned positions + biases


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, model_name",
    [("gpipe", "tiny"), ("1f1b", "tiny"), ("interleaved-1f1b", "tiny:4")],  # interleaved: 2 stages per rank
)
def test_pipeline_matches_one_process(tiny_config, tmp_path, tmp_path_factory, schedule, model_name):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(pp=2, pp_schedule=schedule), model_name, val_rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dp", [dict(dp_shard=2), dict(dp_replicate=2)], ids=["fsdp", "ddp"])
def test_pipeline_with_data_parallel_on_four_processes(tiny_config, tmp_path, tmp_path_factory, dp):
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(pp=2, **dp), "tiny")


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule, model_name",
    [("1f1b", "llama-tiny"), ("interleaved-1f1b", "tiny:4")],  # rotary positions; tied vocab-parallel embedding
)
def test_pipeline_with_tensor_parallel_on_four_processes(tiny_config, tmp_path, tmp_path_factory, schedule, model_name):
    # sequence parallel: each tp rank sends its sequence shard to the next stage
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(tp=2, pp=2, pp_schedule=schedule), model_name)


@pytest.mark.slow
def test_lora_fine_tuning_under_tp_and_fsdp_matches_one_process(tiny_config, tmp_path, tmp_path_factory, tiny_bases,
                                                                 sft_data):
    """LoRA on column- and row-parallel layers, from a base checkpoint, on packed examples whose prompts are
    masked: the adapters split with their layers (tp=2, sequence parallel) and sharded by FSDP2 (dp_shard=2)
    train as in one process."""
    layout = dict(tp=2, dp_shard=2, sequence_parallel=True)
    lora = (f"--finetune.base={tiny_bases('llama-tiny')}", f"--finetune.data={sft_data}", "--lora.r=4",
            "--lora.targets=q_proj,k_proj,o_proj,gate_proj,down_proj")
    _check_parity(tiny_config, tmp_path, tmp_path_factory, layout, "llama-tiny", extra=lora)


@pytest.mark.slow
def test_lora_fine_tuning_through_pipeline_stages_matches_one_process(tiny_config, tmp_path, tmp_path_factory, tiny_bases,
                                                                       sft_data):
    """LoRA through two 1F1B stages on padded examples of varying length, with a tied embedding that stays
    frozen: each stage trains its layers' adapters as one process does."""
    lora = (f"--finetune.base={tiny_bases()}", f"--finetune.data={sft_data}", "--finetune.packing=false",
            "--lora.r=4", "--lora.targets=q_proj,v_proj,up_proj")
    _check_parity(tiny_config, tmp_path, tmp_path_factory, dict(pp=2), "tiny", extra=lora)
