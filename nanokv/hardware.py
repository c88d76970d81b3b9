"""What this machine can do, read from the machine, never assumed: the CPU's instruction sets,
and from them the device and dtype a run gets.

bfloat16 pays on a CPU only where it has bfloat16 arithmetic (AVX-512 BF16, AMX, or
AVX-NE-CONVERT). Elsewhere torch emulates it: on an AVX2-only AMD EPYC a bfloat16
matrix-vector product ran ~40x slower than float32, and oneDNN's bfloat16 weight packing
refuses to run at all ("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl
and avx512dq"). So `--dtype auto` is bfloat16 on CUDA and on such CPUs, float32 elsewhere.

NANOKV_CPU_ISA=avx2 makes nanokv see an AVX2-only CPU on any x86 machine (no AVX-512, AMX or
AVX-NE-CONVERT: no oneDNN packing, no bfloat16 matrix-vector kernel, C++ kernels built with
-mavx2 -mfma), so that a test on a newer machine covers the path most users' CPUs take.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ISA_VARIABLE = "NANOKV_CPU_ISA"
ISAS = ("native", "avx2")
# what an AVX2-only x86 CPU lacks: every AVX-512 extension, AMX, AVX-NE-CONVERT and AVX-VNNI
NEWER_THAN_AVX2 = ("avx512", "amx", "avx_ne_convert", "avx_vnni")


def cpu_isa() -> str:
    """The instruction sets nanokv may use: "native" (all the CPU has) or "avx2" (NANOKV_CPU_ISA)."""
    isa = os.environ.get(ISA_VARIABLE, "native").strip().lower() or "native"
    if isa not in ISAS:
        raise ValueError(f"{ISA_VARIABLE}={isa!r} is not a CPU instruction-set level; valid: {', '.join(ISAS)}")
    return isa


@lru_cache(maxsize=None)
def _cpuinfo(key: str) -> str:
    """The first `key` line of /proc/cpuinfo: "" where there is none (not Linux, not x86), so
    every choice below takes the plain path."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == key), "")


def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of /proc/cpuinfo, less what NANOKV_CPU_ISA=avx2 hides."""
    flags = frozenset(_cpuinfo("flags").split())
    if cpu_isa() == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(NEWER_THAN_AVX2))
    return flags


def cpu_has_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively (rather than torch emulating it)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})


def onednn_packs_bfloat16() -> bool:
    """Whether oneDNN's bfloat16 linear weights (torch.ops.mkldnn._reorder_linear_weight) run
    here: torch demands AVX-NE-CONVERT, or AVX-512 BW + VL + DQ, and raises otherwise."""
    flags = cpu_flags()
    return torch.backends.mkldnn.is_available() and (
        "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags)


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda when available, else cpu; a device this machine lacks is a ValueError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "cpu, cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: {valid}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available ({why}); valid: {valid}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; valid: {valid}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA and on CPUs with bfloat16 arithmetic, float32 elsewhere.
    An explicit name is honoured where it works: float16 on a CPU is refused (torch's CPU float16
    matmuls are unusably slow), bfloat16 on a CPU without bfloat16 arithmetic runs, with one line
    on stderr saying float32 is faster there."""
    if isinstance(dtype, torch.dtype):
        dtype = next((name for name, d in DTYPES.items() if d == dtype), str(dtype))
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    on_cpu = torch.device(device).type == "cpu"
    if dtype == "auto":
        if not on_cpu:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bfloat16() else torch.float32
    if on_cpu and dtype == "float16":
        raise ValueError("dtype 'float16' is not served on CPU (its matmuls are unusably slow there); "
                         "valid on CPU: auto, float32, bfloat16")
    if on_cpu and dtype == "bfloat16" and not cpu_has_bfloat16():
        print("nanokv: this CPU has no bfloat16 arithmetic (AVX-512 BF16, AMX or AVX-NE-CONVERT), so bfloat16 "
              "is emulated and much slower than float32 here; --dtype auto picks float32", file=sys.stderr)
    return DTYPES[dtype]
