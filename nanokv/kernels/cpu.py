"""CPU kernels in C++, built on first use with the machine's C++ compiler: cpu_decode.cpp (decode
attention, with the probabilities when a method asks; KV writes), cpu_quant_decode.cpp (decode
attention over a quantized cache), cpu_quest.cpp (Quest's page scores and picks), cpu_gemv.cpp
(bfloat16 matrix-vector products), cpu_layers.cpp (RMSNorm and RoPE); cpu_common.h holds what
they share.

The plain-torch decode (reference.py) is right but slow on a CPU: each layer copies every
head's blocks out of the pool and runs ~20 small tensor ops. The C++ kernel is one task per
(sequence, kv-head). In a batch of 64 the decode attention took most of a step; see the README's
benchmarks for what moved. In a small batch, the model's norms and RoPEs cost more in torch's
per-op dispatch than in arithmetic, so they too get one C++ call each.

The build is one compiler call against torch's headers, cached by a hash of the sources, the
flags, the torch version and the CPU's flags under nanokv's cache folder (`NANOKV_CACHE`, else
~/.cache/nanokv/kernels). Without a compiler, or if the build fails, `load()` returns False with
one warning, and the engine runs the plain-torch twins.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from nanokv.hardware import cpu_flags, cpu_isa
from nanokv.paths import cache_dir

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_decode.cpp", "cpu_gemv.cpp", "cpu_layers.cpp",
                                                                    "cpu_quant_decode.cpp", "cpu_quest.cpp")]
HEADERS = [Path(__file__).with_name("cpu_common.h")]  # what the sources share (a change rebuilds too)


def _build_command(sources: list[Path], output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch.compiled_with_cxx11_abi())
    # NANOKV_CPU_ISA=avx2: the code an AVX2-only CPU gets (cpu_gemv.cpp's AVX512-BF16 part drops out)
    target = ["-mavx2", "-mfma"] if cpu_isa() == "avx2" else ["-march=native"]
    # -fassociative-math lets the compiler sum a dot product as a tree of vector adds
    return [os.environ.get("CXX", "c++"), "-O3", *target, "-fno-math-errno", "-fno-trapping-math",
            "-fno-signed-zeros", "-fassociative-math", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-isystem{p}" for p in include_paths()), *map(str, sources),
            "-o", str(output), *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]


def _library_path() -> Path:
    cpu = " ".join(sorted(cpu_flags()))
    flags = " ".join(_build_command(SOURCES, Path("x")))
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + flags.encode() + torch.__version__.encode()
                         + cpu.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"nanokv_cpu_{key}.so"


@lru_cache(maxsize=None)
def load() -> bool:
    """Build (once per machine and torch) and load the kernels: True when torch.ops.nanokv_cpu
    is ready, False (after one warning) when the plain-torch path has to serve."""
    library = _library_path()
    try:
        if not library.exists():
            print("nanokv: building the C++ CPU kernels (once per machine and torch, ~20-60 s)...", file=sys.stderr,
                  flush=True)
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built = Path(tmp) / library.name
                subprocess.run(_build_command(SOURCES, built), check=True, capture_output=True, text=True)
                os.replace(built, library)  # atomic: a parallel build never sees half a file
        torch.ops.load_library(str(library))
        return True
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"nanokv: the C++ CPU kernels could not be built, using plain torch "
                      f"({detail.strip().splitlines()[-1] if detail.strip() else error})", stacklevel=2)
        return False


def write_kv(k_pool, v_pool, pos_pool, slots, k, v, positions):
    """reference.write_kv: slots [H, T], k and v [T, H, D], positions [T]."""
    torch.ops.nanokv_cpu.write_kv(k_pool, v_pool, pos_pool, slots, k.to(k_pool.dtype), v.to(v_pool.dtype), positions)


def gemv_available() -> bool:
    """Whether `gemv` was built (it needs AVX512-BF16; elsewhere oneDNN serves every matmul)."""
    return load() and torch.ops.nanokv_cpu.gemv_available()


def gemv(x, weight, bias=None):
    """F.linear for a few rows of bfloat16 x [M, K] over a plain bfloat16 weight [N, K] -> [M, N]."""
    return torch.ops.nanokv_cpu.gemv(x, weight, bias)


def paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None, return_probs=False,
                 bias=None):
    """reference.paged_attention for one query per sequence: q [B, Hq, D], q_pos [B] -> [B, Hq, D];
    with `return_probs` also the probabilities [B, Hkv, group, nb * block_size] float32, 0 where
    masked or past a head's length (the twin's layout); `bias` [N, block_size] float32, added to each
    slot's scaled score (ops of their own: the unbiased ones read nothing more)."""
    ops = torch.ops.nanokv_cpu
    if bias is not None:
        op = ops.paged_decode_bias_probs if return_probs else ops.paged_decode_bias
        return op(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, bias, sliding_window or 0)
    op = ops.paged_decode_probs if return_probs else ops.paged_decode
    return op(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window or 0)


def quantized_decode(q, q_pos, quant, qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths):
    """reference.quantized_decode_attention (cpu_quant_decode.cpp): q [B, Hq, D], quant a QuantBlocks
    with float16 scales -> [B, Hq, D] in q's dtype (computed in float32)."""
    out = torch.ops.nanokv_cpu.quantized_decode(
        q.float(), q_pos, quant.k_codes, quant.k_scale, quant.k_zero, quant.v_codes, quant.v_scale, quant.v_zero,
        quant.k_bits, quant.v_bits, quant.group_size, quant.keys_per_channel, qtables, qlens, k_pool, v_pool, pos_pool,
        tables, lengths)
    return out.to(q.dtype)


def serves(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether rms_norm and rope take x and the `others` they are given with it: float32 or
    bfloat16 tensors on the CPU, all in x's dtype, kernels built, and no gradient wanted through
    them (the C++ ops have no backward; calibration differentiates through the model)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)):
        return False
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == x.dtype for t in others) and load())


def rms_norm(x, weight, eps):
    """RMSNorm.forward of nanokv/models/llama.py in one pass: x [..., H], weight [H] in x's dtype."""
    return torch.ops.nanokv_cpu.rms_norm(x, weight, eps)


def rope(x, cos, sin):
    """apply_rope of nanokv/models/rope.py in one pass: x [T, heads, D], cos and sin [T, D]."""
    return torch.ops.nanokv_cpu.rope(x, cos, sin)


def page_scores(q, kmin, kmax, tables):
    """reference.page_scores (Quest's page bounds, cpu_quest.cpp): q [B, Hq, D], kmin and kmax [N, D],
    tables [B, Hkv, nb] -> [B, Hkv, nb] float32."""
    return torch.ops.nanokv_cpu.page_scores(q, kmin, kmax, tables)


def quest_select(q, kmin, kmax, tables, lengths, block_size, pages):
    """One Quest step's reduced tables [B, Hkv, min(pages, nb)] and lengths [B, Hkv] (cpu_quest.cpp):
    each head's newest page and its top pages - 1 others by page_scores, in table order (-1 after);
    reference.page_scores then reference.quest_pages in one pass."""
    return torch.ops.nanokv_cpu.quest_select(q, kmin, kmax, tables, lengths, block_size, pages)
