"""The one answer to "what can this CPU do", how ONEDNN_MAX_CPU_ISA caps it, and the precision rule built on it."""

import pytest
import torch

from mtnlg.errors import MtnlgError
from mtnlg.hardware import CPU, cap_flags, inference_dtype, this_cpu

ZEN4 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"})
SAPPHIRE_RAPIDS = ZEN4 | {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}


def test_the_cap_keeps_the_flags_of_its_level_and_below():
    assert cap_flags(SAPPHIRE_RAPIDS, "") == SAPPHIRE_RAPIDS
    assert cap_flags(SAPPHIRE_RAPIDS, "ALL") == SAPPHIRE_RAPIDS
    assert cap_flags(SAPPHIRE_RAPIDS, "avx2") == {"avx2"}
    assert cap_flags(SAPPHIRE_RAPIDS, "SSE41") == set()
    assert cap_flags(SAPPHIRE_RAPIDS, "AVX512_CORE") == {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    assert cap_flags(SAPPHIRE_RAPIDS, "AVX512_CORE_BF16") == ZEN4
    assert cap_flags(SAPPHIRE_RAPIDS, "AVX10_1_512") == ZEN4 | {"avx512_fp16"}  # oneDNN's newer name
    assert cap_flags(frozenset({"bf16", "i8mm"}), "AVX2") == {"bf16", "i8mm"}  # ARM flags are not x86 levels


def test_fast_paths_follow_the_flags():
    zen2 = CPU("AMD EPYC 7B12", "x86_64", frozenset({"avx2"}))
    assert zen2.packed_linear == torch.backends.mkldnn.is_available()
    assert not zen2.bf16 and "AVX512_BF16" in zen2.missing_bf16()
    assert CPU("AMD EPYC 9B14", "x86_64", ZEN4).bf16 == torch.backends.mkldnn.is_available()
    assert CPU("Xeon", "x86_64", frozenset({"avx2", "avx_ne_convert"})).bf16 == torch.backends.mkldnn.is_available()
    m2 = CPU("Apple M2", "arm64", frozenset({"bf16", "i8mm"}))
    assert not m2.packed_linear and not m2.bf16 and "arm64" in m2.missing_bf16()
    assert "flags: bf16 i8mm" in m2.describe() and "fast paths: none" in m2.describe()


def test_this_cpu_obeys_the_cap(cap_cpu):
    cap_cpu("AVX2")
    cpu = this_cpu()
    assert not cpu.flags & {"avx512f", "avx512_bf16", "amx_bf16"}
    assert not cpu.bf16 and "ONEDNN_MAX_CPU_ISA=AVX2" in cpu.describe()


def test_inference_dtype_auto_is_bf16_only_where_native(cap_cpu):
    cpu = torch.device("cpu")
    native = this_cpu().bf16
    assert inference_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert inference_dtype("fp32", cpu) == torch.float32
    assert inference_dtype("auto", cpu, packed=False) == torch.float32  # tensor-parallel shards
    cap_cpu("AVX2")
    assert inference_dtype("auto", cpu) == torch.float32
    with pytest.raises(MtnlgError, match=r"need bf16 instructions .*lacks; use --dtype fp32"):
        inference_dtype("bf16", cpu)
    with pytest.raises(MtnlgError, match="dtype 'half' is not one of: auto, fp32, bf16"):
        inference_dtype("half", cpu)
