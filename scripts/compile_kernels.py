"""Compile every Triton kernel specialization nanokv launches for a GPU, on any machine.

    python scripts/compile_kernels.py                 # sm_90 (H100/H200) and sm_80 (A100)
    python scripts/compile_kernels.py --arch 90 -v    # one target; registers, spills, shared memory

The tests run the kernels under Triton's interpreter on CPU, which accepts code a GPU compiler
rejects (tl.dot tiles under 16, mixed dtypes in a dot, too much shared memory for num_stages).
This runs each kernel's Python wrapper on small CPU tensors with the launches recorded instead of
run, then compiles every recorded specialization (every autotune config too) down to a cubin
with Triton's own ptxas: no GPU and no driver needed. It exits 1 if any fails to compile.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import sys
from contextlib import contextmanager

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@contextmanager
def recorded_launches():
    """Within: a kernel launch records (kernel, bound arguments, launch options) and runs nothing;
    an autotuned kernel records one launch per config."""
    launches = []
    jit_run, tuned_run = JITFunction.run, Autotuner.run

    def record(fn, args, kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        bound = dict(zip(fn.arg_names, args), **kwargs)
        for p in fn.params:
            if p.name not in bound and p.default is not inspect.Parameter.empty:
                bound[p.name] = p.default
        launches.append((fn, bound, options))

    def run(self, *args, grid, warmup, **kwargs):
        record(self, args, kwargs)

    def run_tuned(self, *args, **kwargs):
        for config in self.configs:
            record(self.fn, args, dict(kwargs, **config.all_kwargs()))

    JITFunction.run, Autotuner.run = run, run_tuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuned_run


def specialized(fn, bound, backend):
    """Each argument's (type, what the launch specializes on), as JITFunction.run takes them: a
    pointer or an integer divisible by 16 is compiled as such (vectorized loads hang on it), an
    integer 1 as a constant."""
    return [("constexpr", bound[p.name]) if p.is_constexpr or bound[p.name] is None else
            native_specialize_impl(backend, bound[p.name], p.is_const, not p.do_not_specialize,
                                   not p.do_not_specialize_on_alignment) for p in fn.params]


def compile_launch(fn, bound, options, target):
    """-> the compiled kernel (raises what the compiler raises)."""
    backend = make_backend(target)
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, (kind, spec)) in enumerate(zip(fn.params, specialized(fn, bound, backend))):
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def ptxas_usage(kernel, arch) -> str:
    """Registers and spills per thread, from Triton's own ptxas run verbosely over the PTX."""
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        suffix = "a" if arch >= 90 else ""
        run = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    usage = re.findall(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
    return f"{usage[0] if usage else '?'} registers, {spills[0] if spills else '?'} B spilled"


def launch_all():
    """Every wrapper, over the shapes and options the engine uses, with launches recorded."""
    from nanokv.kernels import latent_decode, paged_decode, prefill, quant_decode, quest, two_part_decode, write_kv
    from nanokv.cache.pruned_cache import PrunedBlockPool
    from nanokv.cache.quant_pool import QuantSpec
    from nanokv.methods.leankv import HeteroCodec

    B, Hq, Hkv, D, bs, nb = 2, 8, 2, 128, 16, 8
    with recorded_launches() as launches:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            q = torch.randn(B, Hq, D, dtype=dtype)
            pools = [torch.randn(B * Hkv * nb, bs, D, dtype=dtype) for _ in range(2)]
            pos = torch.arange(bs, dtype=torch.int32).repeat(B * Hkv * nb, 1)
            tables = torch.arange(B * Hkv * nb).view(B, Hkv, nb)
            lengths = torch.full((B, Hkv), nb * bs)
            q_pos = torch.full((B,), nb * bs - 1)
            for window in (None, 64):
                for probs in (False, True):
                    paged_decode.paged_decode_attention(q, q_pos, *pools, pos, tables, lengths, window, probs)
                T = 48
                cu = torch.tensor([0, T, 2 * T], dtype=torch.int32)
                qp = torch.randn(2 * T, Hq, D, dtype=dtype)
                for obs in (None, 16):
                    prefill.prefill_attention(qp, torch.arange(T).repeat(2), cu, *pools, pos, tables, lengths,
                                              window, obs_window=obs)
            quest.page_scores(q, pools[0][:, 0], pools[1][:, 0], tables)
            # ThinK's slim blocks (ratio 0.4: 77 of 128 key channels), MiniCache's restoring read
            kD = D - int(0.4 * D)
            pruned = PrunedBlockPool(B * Hkv * nb * 2 + 1, bs, D, kD, dtype)
            slim = [pruned.slim_fields[name] for name in ("k", "v", "pos")]
            two_part_decode.pruned_decode_attention(q, q_pos, *slim, tables, lengths,
                                                    torch.arange(kD).repeat(B, Hkv, 1), pruned.k, pruned.v,
                                                    pruned.pos, tables, lengths)
            magnitudes = [torch.ones(B * Hkv * nb, bs) for _ in range(2)]
            two_part_decode.paired_decode_attention(q, q_pos, *pools, pos, *magnitudes, tables, lengths, tables,
                                                    lengths)
            # a latent cache's head groups (LoRC: a head a group; Palu: 4 heads of 128 at ranks 256)
            for d, heads, (r_k, r_v) in ((128, 1, (64, 64)), (64, 2, (24, 40)), (128, 4, (256, 256))):
                m = -(-(r_k + r_v) // 32)
                chunks = [torch.randn(B * Hkv * nb, bs, 16, dtype=dtype) for _ in range(2)]
                for window in (None, 64):
                    latent_decode.latent_decode_attention(
                        torch.randn(B, Hkv * heads * 4, d, dtype=dtype), q_pos, *chunks, pos, tables,
                        torch.full((B, Hkv), nb * bs // m * m), m, torch.randn(Hkv, heads * d, r_k),
                        torch.randn(Hkv, heads * d), (r_k, r_v), *torch.randn(2, nb * bs, d), window)
            slots = torch.arange(Hkv * 4).view(Hkv, 4)
            write_kv.write_kv(*pools, pos, slots, torch.randn(4, Hkv, D, dtype=dtype),
                              torch.randn(4, Hkv, D, dtype=dtype), torch.arange(4))
            # the engine's quantized blocks (R = 128, G = 32: KIVI's, and LeanKV's keys wider than its
            # values) and residual blocks (a row's worth of tokens); the tiles depend on the head dim
            for d, spec in itertools.product((64, 128), (QuantSpec(2, True), QuantSpec(4, True), QuantSpec(8, False),
                                                         HeteroCodec(8, 4))):
                R, rbs, nq = spec.block_size, spec.full_block_size(d, dtype), 2
                packed = spec.encode(torch.randn(B * Hkv * nq, R, d), torch.randn(B * Hkv * nq, R, d), 0, None)
                k_bits, v_bits = spec.packed_bits(0)
                quant = type("QuantBlocks", (), dict(block_size=R, group_size=spec.group_size, k_bits=k_bits,
                                                     v_bits=v_bits, keys_per_channel=spec.keys_per_channel, **packed))
                residual = [torch.randn(B * Hkv * nb, rbs, d, dtype=dtype) for _ in range(2)]
                quant_decode.quantized_decode_attention(
                    torch.randn(B, Hq, d, dtype=dtype), q_pos, quant, torch.arange(B * Hkv * nq).view(B, Hkv, nq),
                    torch.full((B, Hkv), nq * R), *residual, torch.zeros(B * Hkv * nb, rbs, dtype=torch.int32),
                    tables, lengths)
                # a quantized cache's prefill reads its residual blocks: not a power of two of tokens
                prefill.prefill_attention(torch.randn(T, Hq, d, dtype=dtype), torch.arange(T), cu[:2], *residual,
                                          torch.zeros(B * Hkv * nb, rbs, dtype=torch.int32), tables[:1], lengths[:1])
    return launches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each kernel's registers and shared memory")
    args = p.parse_args(argv)
    launches = launch_all()
    seen, failed = set(), 0
    for arch in args.arch or [90, 80]:
        target = GPUTarget("cuda", arch, 32)
        for fn, bound, options in launches:
            constants = {p.name: bound[p.name] for p in fn.params if p.is_constexpr}
            specs = tuple(specialized(fn, bound, make_backend(target)))
            key = (arch, fn, specs, tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            label = f"sm_{arch} {fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__} {specs[0][0]} {constants} {options}"
            try:
                kernel = compile_launch(fn, bound, options, target)
            except Exception as e:
                failed += 1
                print(f"FAIL {label}\n     {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
                continue
            if args.verbose:
                print(f"ok   {label}\n     {ptxas_usage(kernel, arch)}, shared {kernel.metadata.shared} B")
    print(f"{len(seen) - failed} specializations compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
