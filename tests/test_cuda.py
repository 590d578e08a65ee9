"""The CUDA paths: bf16 autocast training, FSDP2's bf16 policy, flash attention, and generation that agrees
with the CPU. Skipped without a GPU; benchmarks/gpu_check.sh runs them where there is one."""

import os
import socket
import subprocess

import pytest
import torch

import mtnlg
from mtnlg.checkpoint import load_model
from mtnlg.config import ModelConfig
from mtnlg.model.gpt import GPT, cross_entropy
from mtnlg.train.metrics import read_metrics
from mtnlg.train.trainer import Trainer

GPU = torch.cuda.is_available()


def cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not GPU, reason="no CUDA device")(test))


@pytest.mark.skipif(GPU, reason="checks the answer without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_passes():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert proc.returncode == 0 and proc.stdout.startswith("no CUDA device"), proc.stderr


@cuda
def test_training_autocasts_to_bf16_and_saves_fp32(tiny_config):
    cfg = tiny_config("--train.device=cuda", "--train.max_steps=30", "--train.lr=3e-3", "--train.eval_interval=30")
    trainer = Trainer(cfg)
    assert trainer.precision.compute == torch.bfloat16  # train.dtype auto on CUDA
    result = trainer.fit()
    losses = [r["loss"] for r in read_metrics(cfg.train.out_dir) if "loss" in r]
    assert losses[-1] < losses[0] - 1.0 and result.val_loss < losses[0]
    model = load_model(result.checkpoint)[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@cuda
def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_weights():
    """One rank of FSDP2 under NCCL with the policy the Trainer uses for bf16: the step matches bf16 autocast."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mtnlg.hardware import Precision
    from mtnlg.parallel.parallelize import apply_fsdp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl")
    try:
        reference = GPT(ModelConfig.from_name("tiny"), seed=0).cuda()
        sharded = GPT(ModelConfig.from_name("tiny")).cuda()
        sharded.load_state_dict(reference.state_dict())
        precision = Precision.for_training("bf16", torch.device("cuda"))
        apply_fsdp(sharded, init_device_mesh("cuda", (1,), mesh_dim_names=("dp_shard",)), precision)
        x = torch.randint(0, 512, (4, 64), device="cuda")
        logits = sharded(x[:, :-1])
        assert logits.dtype == torch.bfloat16
        cross_entropy(logits, x[:, 1:]).backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = reference(x[:, :-1])
        cross_entropy(expected, x[:, 1:]).backward()
        torch.testing.assert_close(logits.float(), expected.float(), atol=0.05, rtol=0.05)
        for (name, p), q in zip(sharded.named_parameters(), reference.parameters()):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.allclose(p.grad.full_tensor(), q.grad, atol=2e-2, rtol=0.1), name
    finally:
        dist.destroy_process_group()


@cuda
def test_flash_attention_runs_forward_and_backward():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("tiny", d_model=256, n_head=4)).cuda().to(torch.bfloat16)  # head_dim 64
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these shapes
        flash = model(x)
        flash.float().sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        math = model(x)
    torch.testing.assert_close(flash.float(), math.float(), atol=0.05, rtol=0.05)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@cuda
def test_greedy_generation_on_cuda_equals_cpu(tiny_config):
    cfg = tiny_config("--train.max_steps=60", "--train.lr=3e-3", "--train.eval_interval=0")
    checkpoint = Trainer(cfg).fit().checkpoint
    prompts = ["The model", "Training runs on", "A"]
    params = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    on_gpu = mtnlg.load(checkpoint, "cuda", dtype="fp32").generate(prompts, **params)
    on_cpu = mtnlg.load(checkpoint, "cpu", dtype="fp32").generate(prompts, **params)
    assert [c.token_ids for c in on_gpu] == [c.token_ids for c in on_cpu]
