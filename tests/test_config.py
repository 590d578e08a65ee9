import pytest

from mtnlg.config import PRESETS, Config, ModelConfig, load_config
from mtnlg.errors import MtnlgError
from mtnlg.model.flops import model_size


def test_heads_must_divide_hidden_names_field_and_choices():
    with pytest.raises(MtnlgError, match=r"model\.d_model \(100\) must be divisible by model\.n_head \(3\).*1, 2, 4, 5"):
        ModelConfig(d_model=100, n_head=3)


def test_kv_heads_must_divide_heads():
    with pytest.raises(MtnlgError, match=r"model\.n_kv_head"):
        ModelConfig(n_head=8, n_kv_head=3, d_model=64)


@pytest.mark.parametrize("field", ["n_layer", "d_model", "vocab_size", "max_seq_len"])
def test_non_positive_sizes_name_the_field(field):
    with pytest.raises(MtnlgError, match=rf"model\.{field} must be a positive integer, got -1"):
        ModelConfig(**{field: -1})


def test_unknown_preset_lists_choices():
    with pytest.raises(MtnlgError, match="unknown model preset 'gpt5'.*tiny, demo, gpt2"):
        ModelConfig.from_name("gpt5")


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(MtnlgError, match=r"unknown key model\.n_layers; did you mean model\.n_layer\?"):
        load_config(None, ["--model.n_layers", "4"])


def test_unknown_section_and_bad_value():
    with pytest.raises(MtnlgError, match=r"unknown config section \[optim\]"):
        load_config(None, ["--optim.lr", "1"])
    with pytest.raises(MtnlgError, match=r"train\.max_steps must be int, got 'ten'"):
        load_config(None, ["--train.max_steps", "ten"])
    with pytest.raises(MtnlgError, match="model.norm is 'batchnorm'; choose one of: layernorm, rmsnorm"):
        load_config(None, ["--model.norm=batchnorm"])


def test_global_batch_must_be_a_multiple_of_micro_batch():
    with pytest.raises(MtnlgError, match=r"global_batch_size \(10\) must be a multiple of train\.micro_batch_size \(4\)"):
        load_config(None, ["--train.micro_batch_size=4", "--train.global_batch_size=10"])


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "demo"\nn_layer = 3\n[train]\nlr = 1e-3\nmax_steps = 50\n')
    cfg = load_config(path, ["--train.max_steps", "7", "--model.tie_embeddings=false"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.tie_embeddings) == (3, 256, False)
    assert (cfg.train.lr, cfg.train.max_steps) == (1e-3, 7)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(MtnlgError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(MtnlgError, match="invalid TOML"):
        load_config(bad)


def test_mt_nlg_530b_size_and_memory():
    cfg = ModelConfig.from_name("mt-nlg-530b")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.max_seq_len, cfg.vocab_size) == (105, 20480, 128, 2048, 51200)
    size = model_size(cfg)
    assert abs(size.params - 530e9) / 530e9 < 0.01
    assert size.training_bytes == 18 * size.params
    assert 9.3e12 < size.training_bytes < 9.7e12


def test_llama_preset_is_llama_shaped():
    cfg = ModelConfig.from_name("llama-1b")
    assert (cfg.norm, cfg.mlp, cfg.position, cfg.n_kv_head < cfg.n_head) == ("rmsnorm", "swiglu", "rotary", True)
    assert set(PRESETS) >= {"tiny", "demo", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "mt-nlg-530b"}


def test_old_checkpoint_configs_still_load():
    """Checkpoints written before [parallel] existed kept activation checkpointing in [train]."""
    assert Config.from_dict({"train": {"activation_checkpointing": True}}).parallel.activation_checkpointing == "full"
    assert Config.from_dict({"train": {"activation_checkpointing": False}}).parallel.activation_checkpointing == "none"
