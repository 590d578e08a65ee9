import math

import pytest

from mtnlg.config import ModelConfig, TrainConfig
from mtnlg.model.gpt import GPT
from mtnlg.train.optim import batch_size_at, build_optimizer, lr_at


def test_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the decay
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_decay_steps_can_differ_from_max_steps():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, max_steps=100, decay_steps=50, min_lr_ratio=0.0)
    assert lr_at(25, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(75, cfg) == 0.0


def test_batch_ramp_up_like_mt_nlg():
    cfg = TrainConfig(micro_batch_size=32, global_batch_size=1920, rampup_start=32, rampup_increment=32, rampup_samples=59000)
    assert batch_size_at(0, cfg) == 32
    assert batch_size_at(999, cfg) == 32
    assert batch_size_at(1000, cfg) == 64  # 59 increments over 59000 samples: one per 1000
    assert batch_size_at(58999, cfg) == 1920 - 32
    assert batch_size_at(59000, cfg) == 1920
    assert TrainConfig(global_batch_size=64).global_batch_size == batch_size_at(0, TrainConfig(global_batch_size=64))


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig.from_name("tiny"))
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["betas"] == (0.9, 0.95)
    assert decay["eps"] == TrainConfig().eps and decay["foreach"]


def test_frozen_weights_are_left_out_and_empty_groups_dropped():
    model = GPT(ModelConfig.from_name("tiny"))
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    (group,) = build_optimizer(model, TrainConfig(beta2=0.99)).param_groups
    assert group["params"] == [model.lm_head.weight] and group["betas"] == (0.9, 0.99)
