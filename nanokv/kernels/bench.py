"""GPU benchmark of nanokv's Triton kernels against torch's fused attention (and flash-attn).

    python -m nanokv.kernels.bench --json k.json            # every shape
    python -m nanokv.kernels.bench --quick --json k.json    # a few shapes (a minute or so)
    python -m nanokv.kernels.bench --markdown k.json        # k.json as the tables of docs/kernels.md

Llama-3-8B attention heads (32 query heads, 8 kv-heads, head_dim 128), blocks of 16 tokens:
(a) decode: kernels.paged_decode.paged_decode_attention over a pool whose blocks lie at random
    places (so the kernel really follows its block tables), against SDPA over the same KV made
    contiguous and flash_attn_with_kvcache; contexts 4096-32768, batch 1-64;
(b) quant_decode: kernels.quant_decode.quantized_decode_attention over the same contexts held as
    KIVI does (4 and 2 bits, keys per channel, groups of 32, the newest 128 tokens in full
    precision) in a real QuantizedBlockPool, against paged_decode over them in full precision;
(c) quest_decode: Quest at a budget of 512 tokens over 4,096: the engine's page scores, pick and
    paged_decode over the picked blocks (StepAttention._selected_pages), against paged_decode over
    every block;
(d) block_kinds: the decode of the block kinds beyond plain K/V at the Quest shapes, against
    paged_decode over the same context in full precision: ThinK's slim keys (the oldest tokens
    keeping 77 of 128 key channels, the newest 32 whole; kernels.two_part_decode), MiniCache's
    merged layer (every prompt slot restored to the layer's magnitudes, then 32 tokens of its own)
    and Palu's latents (groups of 4 kv-heads, ranks 256; kernels.latent_decode);
(e) prefill: kernels.prefill.prefill_attention against causal SDPA and flash_attn_func, 1024-8192 tokens;
(f) write_kv: kernels.write_kv against the three torch scatters of kernels.reference.write_kv.
Each row: time (ms, triton.testing.do_bench, L2 flushed between runs), bandwidth (bytes of K/V read,
for write_kv read + written, / time), that as a fraction of the device's copy bandwidth (a 1 GiB
device-to-device copy, read + written bytes / time), speedup against the first row of its case
(SDPA, torch for write_kv, full-precision paged_decode for quant_decode, quest_decode and
block_kinds), the
largest difference from that row's output, and TFLOP/s for prefill. Needs a CUDA GPU: elsewhere
it says so and exits 0 (--markdown needs none). Importing it imports only torch.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

HQ, HKV, D, BLOCK_SIZE = 32, 8, 128, 16
DECODE = [(b, s) for s in (4096, 8192, 16384, 32768) for b in (1, 8, 32, 64)]   # (batch, context)
PREFILL = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (4, 2048)]              # (sequences, tokens each)
WRITE = [1, 64, 512, 8192]                                                     # tokens written
QUICK_DECODE, QUICK_PREFILL, QUICK_WRITE = [(1, 4096), (32, 8192)], [(1, 2048)], [64, 8192]
KIVI_BITS, KIVI_GROUP, KIVI_RESIDUAL = (4, 2), 32, 128   # KIVI's settings (nanokv/methods/kivi.py)
QUEST_BUDGET, QUEST = 512, [(1, 4096), (32, 4096)]       # tokens read per head; (batch, context)
THINK_KEPT, RECENT = D - int(0.4 * D), 32   # ThinK's channel_ratio 0.4; its recent window, MiniCache's own tokens
LATENT_GROUP, LATENT_RANK = 4, 256   # Palu's groups of 4 kv-heads, half their 512 numbers a token for K and for V


def do_bench(fn) -> float:
    from triton.testing import do_bench as triton_do_bench
    return triton_do_bench(fn, warmup=25, rep=100)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting the bytes read and the bytes written."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / do_bench(lambda: y.copy_(x)) / 1e6


def paged_kv(B, S, dtype):
    """Random K, V [B, Hkv, S, D] and the same KV paged: every (sequence, kv-head) owns S / 16
    blocks, placed by a random permutation of the pool. -> k, v, k_pool, v_pool, pos_pool, tables, lengths."""
    nb = S // BLOCK_SIZE
    k = torch.randn(B, HKV, S, D, dtype=dtype, device="cuda")
    v = torch.randn(B, HKV, S, D, dtype=dtype, device="cuda")
    tables = torch.randperm(B * HKV * nb, device="cuda").view(B, HKV, nb)
    k_pool = torch.empty(B * HKV * nb, BLOCK_SIZE, D, dtype=dtype, device="cuda")
    v_pool = torch.empty_like(k_pool)
    pos_pool = torch.empty(B * HKV * nb, BLOCK_SIZE, dtype=torch.int32, device="cuda")
    k_pool[tables.flatten()] = k.reshape(-1, BLOCK_SIZE, D)   # block j of (b, h) holds tokens 16j..16j+15
    v_pool[tables.flatten()] = v.reshape(-1, BLOCK_SIZE, D)
    pos_pool[tables.flatten()] = torch.arange(S, dtype=torch.int32, device="cuda").view(nb, BLOCK_SIZE).repeat(B * HKV, 1)
    lengths = torch.full((B, HKV), S, dtype=torch.int64, device="cuda")
    return k, v, k_pool, v_pool, pos_pool, tables, lengths


def decode_impls(B, S, dtype):
    k, v, k_pool, v_pool, pos_pool, tables, lengths = paged_kv(B, S, dtype)
    q = torch.randn(B, HQ, D, dtype=dtype, device="cuda")
    q_pos = torch.full((B,), S - 1, dtype=torch.int64, device="cuda")

    def sdpa():  # one query sees every key: a kv-head's group of query heads rides on the query axis
        qg = q.view(B, HKV, HQ // HKV, D)
        return lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, v)

    def paged():
        from nanokv.kernels.paged_decode import paged_decode_attention
        return lambda: paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths)

    def flash():
        from flash_attn import flash_attn_with_kvcache
        kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()   # [B, S, Hkv, D]
        seqlens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        return lambda: flash_attn_with_kvcache(q.view(B, 1, HQ, D), kc, vc, cache_seqlens=seqlens)

    return [("sdpa", sdpa), ("paged_decode", paged), ("flash_attn", flash)]


def quantized_pool(k, v, bits, dtype):
    """K, V [B, Hkv, S, D] as the engine's KIVI cache holds them: the oldest S - R tokens of each
    head in quantized blocks of R, the newest R (a residual just before its flush) in
    full-precision blocks, all rows of one QuantizedBlockPool at random places.
    -> (QuantBlocks, qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths), the kernel's arguments."""
    from nanokv.cache.quant_pool import SCALE_DTYPE, QuantizedBlockPool, QuantSpec
    from nanokv.kernels.quant import quantize_tokens

    B, _, S, _ = k.shape
    spec, R = QuantSpec(bits, True, KIVI_GROUP, KIVI_RESIDUAL), KIVI_RESIDUAL
    bs = spec.full_block_size(D, dtype)
    nq, nb = (S - R) // R, -(-R // bs)
    pool = QuantizedBlockPool(1 + B * HKV * (nq + nb), spec, D, dtype, device="cuda")
    rows = 1 + torch.randperm(B * HKV * (nq + nb), device="cuda")
    qtables, tables = rows[:B * HKV * nq].view(B, HKV, nq), rows[B * HKV * nq:].view(B, HKV, nb)
    old = slice(0, nq * R)
    packed = quantize_tokens(k[:, :, old].reshape(-1, R, D), v[:, :, old].reshape(-1, R, D), bits, KIVI_GROUP, True,
                             SCALE_DTYPE)
    for name, value in packed.items():
        pool.qfields[name][qtables.flatten()] = value
    pad = nb * bs - R   # the last residual block holds fewer than bs tokens: zeros past them
    for name, x in (("k", k), ("v", v)):
        newest = torch.nn.functional.pad(x[:, :, nq * R:], (0, 0, 0, pad))
        pool.fields[name][tables.flatten()] = newest.reshape(-1, bs, D)
    positions = torch.arange(nq * R, nq * R + nb * bs, dtype=torch.int32, device="cuda")
    pool.fields["pos"][tables.flatten()] = positions.view(nb, bs).repeat(B * HKV, 1)
    qlens = torch.full((B, HKV), nq * R, device="cuda")
    return (pool.quant_blocks(0), qtables, qlens, pool.k, pool.v, pool.pos, tables, torch.full_like(qlens, R))


def quant_impls(B, S, dtype):
    """Full-precision paged decode, then KIVI's quantized decode at each of KIVI_BITS, over the
    same K and V. -> (impls, bytes each reads)."""
    from nanokv.cache.quant_pool import QuantSpec
    from nanokv.kernels.paged_decode import paged_decode_attention
    from nanokv.kernels.quant_decode import quantized_decode_attention

    k, v, k_pool, v_pool, pos_pool, tables, lengths = paged_kv(B, S, dtype)
    q = torch.randn(B, HQ, D, dtype=dtype, device="cuda")
    q_pos = torch.full((B,), S - 1, dtype=torch.int64, device="cuda")
    impls = [("paged_decode", lambda: lambda: paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables,
                                                                     lengths))]
    es = torch.finfo(dtype).bits // 8
    nbytes = {"paged_decode": 2 * B * HKV * S * D * es}
    for bits in KIVI_BITS:
        def make(bits=bits):
            args = quantized_pool(k, v, bits, dtype)
            return lambda: quantized_decode_attention(q, q_pos, *args)
        impls.append((f"kivi{bits}", make))
        block = QuantSpec(bits, True, KIVI_GROUP, KIVI_RESIDUAL).quantized_bytes(D)
        nbytes[f"kivi{bits}"] = B * HKV * ((S - KIVI_RESIDUAL) // KIVI_RESIDUAL * block + 2 * KIVI_RESIDUAL * D * es)
    return impls, nbytes


def quest_impls(B, S, dtype):
    """Full-precision paged decode over every block, then Quest at QUEST_BUDGET as the engine runs
    it on a GPU: page_scores over the blocks' key bounds, reference.quest_pages, paged_decode over
    the picked blocks (and the first two alone). -> (impls, bytes each reads)."""
    from nanokv.kernels.paged_decode import paged_decode_attention
    from nanokv.kernels.quest import page_scores
    from nanokv.kernels.reference import quest_pages

    k, v, k_pool, v_pool, pos_pool, tables, lengths = paged_kv(B, S, dtype)
    kmin, kmax = k_pool.amin(1), k_pool.amax(1)   # each block's key bounds [N, D], as the pool keeps them
    q = torch.randn(B, HQ, D, dtype=dtype, device="cuda")
    q_pos = torch.full((B,), S - 1, dtype=torch.int64, device="cuda")
    pages = QUEST_BUDGET // BLOCK_SIZE   # Quest.pages_to_read (methods/ is a layer above the kernels)

    def select():
        return quest_pages(page_scores(q, kmin, kmax, tables), tables, lengths, BLOCK_SIZE, pages)

    def select_only():   # no output to compare with the baseline's
        select()

    def quest():
        return paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, *select())

    es, nb = torch.finfo(dtype).bits // 8, tables.shape[-1]
    bounds = B * HKV * nb * 2 * D * es
    impls = [("paged_decode", lambda: lambda: paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables,
                                                                     lengths)),
             ("quest_pick", lambda: select_only), ("quest", lambda: quest)]
    return impls, {"paged_decode": 2 * B * HKV * S * D * es, "quest_pick": bounds,
                   "quest": bounds + 2 * B * HKV * pages * BLOCK_SIZE * D * es}


def block_kind_impls(B, S, dtype):
    """Full-precision paged decode, then ThinK's and MiniCache's decode over the same context.
    -> (impls, bytes each reads). Their outputs are other maths than the baseline's: not compared."""
    from nanokv.cache.pruned_cache import PrunedBlockPool
    from nanokv.kernels.paged_decode import paged_decode_attention
    from nanokv.kernels.two_part_decode import paired_decode_attention, pruned_decode_attention

    k, v, k_pool, v_pool, pos_pool, tables, lengths = paged_kv(B, S, dtype)
    q = torch.randn(B, HQ, D, dtype=dtype, device="cuda")
    q_pos = torch.full((B,), S - 1, dtype=torch.int64, device="cuda")
    es, heads, old = torch.finfo(dtype).bits // 8, B * HKV, S - RECENT

    # ThinK: the oldest tokens in slim blocks (their kept channels), the newest RECENT in full ones
    n = PrunedBlockPool(2, BLOCK_SIZE, D, THINK_KEPT, dtype).slim_block_size
    ns, nr = -(-old // n), RECENT // BLOCK_SIZE
    pruned = PrunedBlockPool(1 + heads * (ns + nr), BLOCK_SIZE, D, THINK_KEPT, dtype, "cuda")
    rows = 1 + torch.randperm(heads * (ns + nr), device="cuda")
    stables, ftables = rows[:heads * ns].view(B, HKV, ns), rows[heads * ns:].view(B, HKV, nr)
    channels = torch.stack([torch.randperm(D, device="cuda")[:THINK_KEPT] for _ in range(heads)]).view(B, HKV, -1)
    slim_k = k[:, :, :old].gather(-1, channels[:, :, None].expand(B, HKV, old, THINK_KEPT))
    pad = (0, 0, 0, ns * n - old)
    for name, x in (("k", slim_k), ("v", v[:, :, :old])):
        pruned.slim_fields[name][stables.flatten()] = torch.nn.functional.pad(x, pad).reshape(-1, n, x.shape[-1])
    pruned.slim_fields["pos"][stables.flatten()] = torch.nn.functional.pad(
        torch.arange(old, dtype=torch.int32, device="cuda"), pad[2:]).view(ns, n).repeat(heads, 1)
    for name, x in (("k", k), ("v", v)):
        pruned.fields[name][ftables.flatten()] = x[:, :, old:].reshape(-1, BLOCK_SIZE, D)
    pruned.fields["pos"][ftables.flatten()] = torch.arange(old, S, dtype=torch.int32, device="cuda").view(
        nr, BLOCK_SIZE).repeat(heads, 1)
    slim = [pruned.slim_fields[name] for name in ("k", "v", "pos")]
    recent = torch.full_like(lengths, RECENT)

    def think():
        pruned_decode_attention(q, q_pos, *slim, stables, lengths - RECENT, channels, pruned.k, pruned.v, pruned.pos,
                                ftables, recent)

    # MiniCache: layer a's blocks, every slot restored to layer b's magnitudes, then b's own RECENT
    # tokens (here the first blocks of each head: any blocks do)
    magnitudes = [torch.rand(k_pool.shape[:2], device="cuda") + 0.5 for _ in range(2)]

    def minicache():
        paired_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, *magnitudes, tables, lengths, tables[..., :nr],
                                recent)

    full = 2 * heads * S * D * es
    latent, latent_bytes = latent_case(q, q_pos, B, S, dtype)
    impls = [("paged_decode", lambda: lambda: paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables,
                                                                     lengths)),
             ("think", lambda: think), ("minicache", lambda: minicache), ("palu", lambda: latent)]
    return impls, {"paged_decode": full, "think": heads * (old * (THINK_KEPT + D) * es + 2 * RECENT * D * es),
                   "minicache": full + heads * (S * 8 + 2 * RECENT * D * es), "palu": latent_bytes}


def latent_case(q, q_pos, B, S, dtype):
    """Palu's latent cache at half the numbers: groups of LATENT_GROUP kv-heads, each token's K and
    V latents of LATENT_RANK numbers in 2 * LATENT_RANK / 32 slots of 16-channel blocks at random
    places. -> (the decode call, bytes it reads)."""
    from nanokv.kernels.latent_decode import latent_decode_attention

    G, chunk, m = HKV // LATENT_GROUP, 16, 2 * LATENT_RANK // 32
    nb = S * m // BLOCK_SIZE
    tables = torch.randperm(B * G * nb, device="cuda").view(B, G, nb)
    k_pool, v_pool = (torch.randn(B * G * nb, BLOCK_SIZE, chunk, dtype=dtype, device="cuda") for _ in range(2))
    pos_pool = torch.empty(B * G * nb, BLOCK_SIZE, dtype=torch.int32, device="cuda")
    slots = torch.arange(S, dtype=torch.int32, device="cuda").repeat_interleave(m)   # a token's m slots
    pos_pool[tables.flatten()] = slots.view(nb, BLOCK_SIZE).repeat(B * G, 1)
    lengths = torch.full((B, G), S * m, device="cuda")
    k_basis = torch.linalg.qr(torch.randn(G, LATENT_GROUP * D, LATENT_RANK, device="cuda"))[0]
    k_bias = torch.zeros(G, LATENT_GROUP * D, device="cuda")
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    angles = torch.arange(S, device="cuda").float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def latent():
        latent_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, m, k_basis, k_bias,
                                (LATENT_RANK, LATENT_RANK), cos, sin)
    return latent, B * G * S * (2 * LATENT_RANK * (torch.finfo(dtype).bits // 8) + 4 * m)


def prefill_impls(B, T, dtype):
    k, v, k_pool, v_pool, pos_pool, tables, lengths = paged_kv(B, T, dtype)
    q = torch.randn(B * T, HQ, D, dtype=dtype, device="cuda")
    q_pos = torch.arange(T, device="cuda").repeat(B)
    cu_seqlens = torch.arange(0, B * T + 1, T, dtype=torch.int32, device="cuda")

    def sdpa():  # kv-heads repeated up front: SDPA's GQA path may fall back to the unfused maths
        qh = q.view(B, T, HQ, D).transpose(1, 2).contiguous()
        kx, vx = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
        return lambda: torch.nn.functional.scaled_dot_product_attention(qh, kx, vx, is_causal=True).transpose(1, 2)

    def paged():
        from nanokv.kernels.prefill import prefill_attention
        return lambda: prefill_attention(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths)

    def flash():
        from flash_attn import flash_attn_func
        kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()   # [B, T, Hkv, D]
        return lambda: flash_attn_func(q.view(B, T, HQ, D), kf, vf, causal=True)

    return [("sdpa", sdpa), ("prefill", paged), ("flash_attn", flash)]


def write_impls(T, dtype):
    num_blocks = 4 * (T * HKV // BLOCK_SIZE + 1)
    k_pool = torch.empty(num_blocks, BLOCK_SIZE, D, dtype=dtype, device="cuda")
    v_pool = torch.empty_like(k_pool)
    pos_pool = torch.empty(num_blocks, BLOCK_SIZE, dtype=torch.int32, device="cuda")
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:HKV * T].view(HKV, T)
    k, v = (torch.randn(T, HKV, D, dtype=dtype, device="cuda") for _ in range(2))
    positions = torch.arange(T, device="cuda")
    args = (k_pool, v_pool, pos_pool, slots, k, v, positions)

    def torch_write():
        from nanokv.kernels.reference import write_kv
        return lambda: write_kv(*args)

    def triton_write():
        from nanokv.kernels.write_kv import write_kv
        return lambda: write_kv(*args)

    return [("torch", torch_write), ("write_kv", triton_write)]


def run_case(case, impls, nbytes, copy_bw, flops=None):
    """Time each (name, make) in `impls`; make() builds the call untimed. The first is the baseline.
    nbytes: what each reads (and writes), one number or one per name."""
    rows, base_ms, base_out = [], None, None
    for name, make in impls:
        row = dict(case, impl=name, bytes=nbytes[name] if isinstance(nbytes, dict) else nbytes)
        try:
            fn = make()
            out = fn()   # also compiles
            ms = do_bench(fn)
            if rows and base_out is not None and out is not None:
                row["max_abs_err"] = (out.float().reshape(base_out.shape) - base_out.float()).abs().max().item()
        except Exception as e:   # a missing module or a failing kernel: record it, go on
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"{_label(case):32s} {name:13s} {row['error'][:100]}", flush=True)
            rows.append(row)
            continue
        if not rows:
            base_ms, base_out = ms, out
        row.update(ms=ms, gbps=row["bytes"] / ms / 1e6, frac_copy_bw=row["bytes"] / ms / 1e6 / copy_bw,
                   speedup=base_ms / ms if base_ms else None)
        if flops:
            row["tflops"] = flops / ms / 1e9
        print(f"{_label(case):32s} {name:13s} {ms:9.3f} ms {row['gbps']:8.0f} GB/s {row['frac_copy_bw']:5.2f} of copy"
              + (f"  x{row['speedup']:.2f}" if row["speedup"] else "")
              + (f"  {row['tflops']:6.1f} TFLOP/s" if flops else "")
              + (f"  err {row['max_abs_err']:.1e}" if "max_abs_err" in row else ""), flush=True)
        rows.append(row)
    torch.cuda.empty_cache()
    return rows


def _label(case):
    return " ".join(f"{k}={v}" for k, v in case.items() if k != "dtype")


def fits(nbytes) -> bool:
    return nbytes < 0.8 * torch.cuda.mem_get_info()[0]


# a row's keys that are not its case's
RESULTS = {"kernel", "dtype", "impl", "bytes", "ms", "gbps", "frac_copy_bw", "speedup", "tflops", "max_abs_err",
           "error"}
TIME_RATIO = {"quant_decode", "quest_decode", "block_kinds"}   # kernels whose target is a share of full precision's time


def times(x: float) -> str:
    """A ratio of times as a table shows it: 2.00x, 0.50x, or 1/1,180 when two decimals would read 0."""
    return f"{x:.2f}x" if x >= 0.01 else f"1/{1 / x:,.0f}"


def markdown(report: dict) -> str:
    """The tables of docs/kernels.md from a run's JSON: one per kernel, a row per case and impl."""
    flash = f", flash-attn {report['flash_attn']}" if report.get("flash_attn") else ""
    quick = " (`--quick`)" if report.get("quick") else ""
    lines = [f"{report['device']}, {report['dtype']}, torch {report['torch']}, triton {report['triton']}{flash}; "
             f"copy bandwidth {report['copy_bandwidth_gbps']:,.0f} GB/s{quick}"]
    kernels = list(dict.fromkeys(r["kernel"] for r in report["results"]))
    for kernel in kernels:
        rows = [r for r in report["results"] if r["kernel"] == kernel]
        columns = ["case", "impl", "ms", "GB/s", "of copy bw", "speedup"]
        columns += ["time / baseline"] * (kernel in TIME_RATIO) + ["TFLOP/s"] * any("tflops" in r for r in rows)
        lines += ["", f"**{kernel}**", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for r in rows:
            case = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                             for k, v in r.items() if k not in RESULTS)
            if "error" in r:
                cells = [case, r["impl"], f"error: {r['error'][:80]}"] + [""] * (len(columns) - 3)
            else:
                speedup = r.get("speedup")
                cells = [case, r["impl"], f"{r['ms']:.3f}", f"{r['gbps']:,.0f}", f"{r['frac_copy_bw']:.0%}",
                         times(speedup) if speedup else ""]
                cells += [times(1 / speedup) if speedup else ""] * (kernel in TIME_RATIO)
                cells += [f"{r['tflops']:.1f}" if "tflops" in r else ""] * ("TFLOP/s" in columns)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", "--out", dest="json", default="kernels_bench.json", metavar="PATH",
                   help="where the JSON results go (--out: its older name)")
    p.add_argument("--markdown", metavar="PATH", help="print the JSON results at PATH as markdown tables and exit "
                                                      "(needs no GPU)")
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if not torch.cuda.is_available():
        print("python -m nanokv.kernels.bench needs a CUDA GPU (torch.cuda.is_available() is False); nothing to benchmark.")
        return 0
    import triton
    try:
        import flash_attn
        flash_version = flash_attn.__version__
    except Exception:
        flash_version = None
    torch.manual_seed(0)
    dtype, es = getattr(torch, args.dtype), torch.finfo(getattr(torch, args.dtype)).bits // 8
    copy_bw = copy_bandwidth()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  flash_attn=flash_version, dtype=args.dtype, quick=args.quick, copy_bandwidth_gbps=copy_bw, results=[])
    print(f"{report['device']}  torch {torch.__version__}  triton {triton.__version__}  flash_attn {flash_version}"
          f"  {args.dtype}  copy bandwidth {copy_bw:.0f} GB/s")

    def keep(impls):   # flash-attn only where it imports
        return [(n, m) for n, m in impls if n != "flash_attn" or flash_version]

    def save(rows):   # after every case, so a crash keeps what was measured
        report["results"] += rows
        Path(args.json).write_text(json.dumps(report, indent=1))

    save([])

    decode = QUICK_DECODE if args.quick else DECODE
    for B, S in decode:
        case, kv = dict(kernel="decode", B=B, S=S, dtype=args.dtype), 2 * B * HKV * S * D * es
        if not fits(3 * kv):   # K, V, their pool and flash-attn's copy
            print(f"{_label(case):32s} skipped: does not fit in memory")
            continue
        save(run_case(case, keep(decode_impls(B, S, dtype)), kv, copy_bw))
    for B, S in decode:
        case = dict(kernel="quant_decode", B=B, S=S, dtype=args.dtype)
        if not fits(3 * 2 * B * HKV * S * D * es):   # K, V, their pool, and the quantized pools
            print(f"{_label(case):32s} skipped: does not fit in memory")
            continue
        save(run_case(case, *quant_impls(B, S, dtype), copy_bw))
    for B, S in QUEST:
        case = dict(kernel="quest_decode", B=B, S=S, budget=QUEST_BUDGET, dtype=args.dtype)
        save(run_case(case, *quest_impls(B, S, dtype), copy_bw))
    for B, S in QUEST:
        case = dict(kernel="block_kinds", B=B, S=S, dtype=args.dtype)
        save(run_case(case, *block_kind_impls(B, S, dtype), copy_bw))
    for B, T in QUICK_PREFILL if args.quick else PREFILL:
        case = dict(kernel="prefill", B=B, T=T, dtype=args.dtype)
        flops = 2 * B * HQ * D * T * T   # causal: half of 2 matmuls of 2 * T * T * D flops per head
        save(run_case(case, keep(prefill_impls(B, T, dtype)), 2 * B * HKV * T * D * es, copy_bw, flops))
    for T in QUICK_WRITE if args.quick else WRITE:
        case = dict(kernel="write_kv", T=T, H=HKV, dtype=args.dtype)
        save(run_case(case, write_impls(T, dtype), 2 * 2 * T * HKV * D * es, copy_bw))
    print(f"results in {args.json}; as markdown: python -m nanokv.kernels.bench --markdown {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
