"""What this machine can do: the one place every CPU-specific fast path asks, so that each falls back cleanly.

The answer is read from the operating system (/proc/cpuinfo, or sysctl on macOS) and capped by
`ONEDNN_MAX_CPU_ISA`, the variable that caps oneDNN itself: `ONEDNN_MAX_CPU_ISA=AVX2` makes an AVX-512
machine answer, and compute, like an AVX2-only one. That is how both branches of every fast path are
tested on any machine (tests/conftest.py's `cap_cpu`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import subprocess
from dataclasses import dataclass

import torch

from mtnlg.defaults import INFERENCE_DTYPES

# The flags that matter, in /proc/cpuinfo's spelling, grouped under the oneDNN ISA level that first allows
# them: ONEDNN_MAX_CPU_ISA=LEVEL keeps the flags of LEVEL and of the levels before it.
ISA_LEVELS = (
    ("SSE41", set()),
    ("AVX", set()),
    ("AVX2", {"avx2"}),
    ("AVX2_VNNI", {"avx_vnni"}),
    ("AVX2_VNNI_2", {"avx_ne_convert"}),
    ("AVX512_CORE", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ("AVX512_CORE_VNNI", {"avx512_vnni"}),
    ("AVX512_CORE_BF16", {"avx512_bf16"}),
    ("AVX512_CORE_FP16", {"avx512_fp16"}),
    ("AVX512_CORE_AMX", {"amx_tile", "amx_bf16", "amx_int8"}),
    ("AVX512_CORE_AMX_FP16", {"amx_fp16"}),
)
# oneDNN's newer names for the same levels.
ISA_ALIASES = {"AVX10_1_512": "AVX512_CORE_FP16", "AVX10_1_512_AMX": "AVX512_CORE_AMX",
               "AVX10_1_512_AMX_FP16": "AVX512_CORE_AMX_FP16"}
X86_FLAGS = frozenset().union(*(flags for _, flags in ISA_LEVELS))
ARM_FLAGS = frozenset({"bf16", "i8mm"})
# Instructions that compute bf16 products in hardware (dot products, tiles, or fp32 converts at speed).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")


@dataclass(frozen=True)
class CPU:
    name: str
    arch: str  # platform.machine(): x86_64, arm64, aarch64, ...
    flags: frozenset[str]  # of X86_FLAGS | ARM_FLAGS, after the ONEDNN_MAX_CPU_ISA cap

    @property
    def packed_linear(self) -> bool:
        """oneDNN products on pre-packed weights (inference/cpu.py): measured faster than nn.Linear on x86
        with AVX2 and with AVX-512; not measured on ARM, so not used there."""
        return self.arch in ("x86_64", "AMD64") and "avx2" in self.flags and torch.backends.mkldnn.is_available()

    @property
    def bf16(self) -> bool:
        """bf16 weights run as native bf16 products (through the packed path)."""
        return self.packed_linear and any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8(self) -> bool:
        """int8 weights run as FBGEMM's int8 products (activations quantized per product), which need x86
        with AVX2; measured 5x the packed fp32 product for one row on Zen 4 (docs/benchmarks.md)."""
        return (self.arch in ("x86_64", "AMD64") and "avx2" in self.flags
                and "fbgemm" in torch.backends.quantized.supported_engines)

    def missing_bf16(self) -> str:
        """What a CPU without the bf16 path lacks, in words for an error message."""
        if not self.packed_linear:
            return f"oneDNN's packed products, which mtnlg uses only on x86 with AVX2 (this is {self.arch})"
        return "bf16 instructions (AVX512_BF16, AMX-BF16 or AVX-NE-CONVERT)"

    def describe(self) -> str:
        """Two lines for the top of a benchmark: the CPU and its flags, and the fast paths they allow."""
        paths = [name for name, on in (("packed linear", self.packed_linear), ("bf16 weights", self.bf16),
                                       ("int8 weights", self.int8)) if on]
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return (f"CPU: {self.name} ({self.arch}), {os.cpu_count()} cores; flags: {' '.join(sorted(self.flags)) or 'none'}"
                f"{f' (capped by ONEDNN_MAX_CPU_ISA={cap})' if cap else ''}\n"
                f"fast paths: {', '.join(paths) or 'none (plain PyTorch fp32)'}")


@functools.cache
def this_cpu() -> CPU:
    """The CPU this process runs on (cached: call `this_cpu.cache_clear()` after changing the cap)."""
    name, flags = _read_cpu()
    return CPU(name, platform.machine(), cap_flags(flags, os.environ.get("ONEDNN_MAX_CPU_ISA", "")))


def cap_flags(flags: frozenset[str], max_isa: str) -> frozenset[str]:
    """The flags that oneDNN may use under ONEDNN_MAX_CPU_ISA=max_isa (unset, ALL or unknown: every one)."""
    names = [name for name, _ in ISA_LEVELS]
    level = ISA_ALIASES.get(max_isa.upper(), max_isa.upper())
    if level not in names:
        return flags
    allowed = set().union(*(f for _, f in ISA_LEVELS[: names.index(level) + 1]))
    return frozenset(f for f in flags if f in allowed or f not in X86_FLAGS)


def _read_cpu() -> tuple[str, frozenset[str]]:
    """The processor's name and its flags of interest, from the OS; none where it cannot tell."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            fields: dict[str, str] = {}
            for line in f:
                if not line.strip():
                    break  # the first processor describes them all
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        words = set((fields.get("flags") or fields.get("Features", "")).split())
        name = fields.get("model name") or platform.processor() or platform.machine()
        if "cpu family" in fields:  # virtual machines often say only "AMD EPYC": the family tells which
            name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
        return name, frozenset(words & (X86_FLAGS | ARM_FLAGS))
    if platform.system() == "Darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.processor(), frozenset(
            flag for flag, key in (("bf16", "hw.optional.arm.FEAT_BF16"), ("i8mm", "hw.optional.arm.FEAT_I8MM"))
            if _sysctl(key) == "1"
        )
    return platform.processor() or "unknown", frozenset()


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# Freed blocks up to this size stay with the process; glibc's default hands large ones (from 128 KiB, adapting
# up to 32 MiB) back to the kernel at once, and a training step then pays to fault them in again.
KEEP_FREED_BYTES = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 1 GiB for reuse instead of handing them back to the OS.

    A training step on CPU frees and reallocates the same large activations and gradients every step;
    by default glibc unmaps each one, and the next step faults its pages back in and zeroes them (a
    quarter of the demo's step was system time). Keeping them made the demo's step 15-20% faster
    (docs/benchmarks.md). Returns whether the allocator took the setting (glibc only)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, KEEP_FREED_BYTES)) and bool(libc.mallopt(m_trim_threshold, KEEP_FREED_BYTES))


def inference_dtype(name: str, device: torch.device, packed: bool = True) -> torch.dtype:
    """The dtype of inference weights. "int8" (one CPU process with `CPU.int8`) quantizes the matrix weights
    per output channel, everything else stays fp32; "auto" is bf16 where the device computes bf16 products natively
    (CUDA GPUs that support it; CPUs with bf16 instructions, on the packed path, which `packed=False`
    says is not taken: tensor-parallel shards) and fp32 elsewhere. "bf16" on a CPU without those
    instructions is refused in one line naming what is missing, rather than run on a slow or broken path."""
    from mtnlg.errors import MtnlgError

    if name not in INFERENCE_DTYPES:
        raise MtnlgError(f"dtype {name!r} is not one of: {', '.join(INFERENCE_DTYPES)}")
    if name == "int8":
        cpu = this_cpu()
        if not (device.type == "cpu" and cpu.int8 and packed):
            where = ("a CPU" if device.type != "cpu" else "one process (tp 1)" if not packed
                     else f"x86 with AVX2 and FBGEMM (this is {cpu.name}, {cpu.arch})")
            raise MtnlgError(f"int8 weights run only on {where}; use --dtype fp32 or auto")
        return torch.int8
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        cpu = this_cpu()
        if name == "bf16" and not (device.type == "cpu" and cpu.bf16):
            cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
            capped = f" as capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else ""
            raise MtnlgError(f"bf16 weights need {cpu.missing_bf16()}, which this CPU ({cpu.name}{capped}) lacks; "
                             "use --dtype fp32, or auto to pick the fastest this CPU supports")
        native = device.type == "cpu" and cpu.bf16 and packed
    return torch.bfloat16 if name == "bf16" or (name == "auto" and native) else torch.float32


@dataclass(frozen=True)
class Precision:
    """A run's one precision decision: the dtype parameters are kept in, the dtype products run in, the dtype
    gradients are reduced in. Training keeps fp32 parameters and computes in bf16 under autocast (or, for
    FSDP, in the bf16 copies its gathers make); inference keeps and computes in one dtype."""

    param: torch.dtype
    compute: torch.dtype
    device_type: str
    reduce: torch.dtype = torch.float32

    @classmethod
    def for_training(cls, setting: str, device: torch.device) -> Precision:
        """train.dtype: "auto" is bf16 compute on CUDA and fp32 on CPUs; "bf16" asks for it anywhere."""
        bf16 = setting == "bf16" or (setting == "auto" and device.type == "cuda")
        return cls(torch.float32, torch.bfloat16 if bf16 else torch.float32, device.type)

    @classmethod
    def for_inference(cls, setting: str, device: torch.device, packed: bool = True) -> Precision:
        dtype = inference_dtype(setting, device, packed)
        return cls(dtype, dtype, device.type)

    @property
    def mixed(self) -> bool:
        return self.compute != self.param

    def autocast(self):
        """The context a forward runs in: autocast to the compute dtype when it differs from the parameters'."""
        return torch.autocast(self.device_type, dtype=self.compute) if self.mixed else contextlib.nullcontext()
