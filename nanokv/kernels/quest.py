"""Quest's page scores in Triton: the twin of `reference.page_scores`.

Quest (nanokv/methods/quest.py) keeps, for every cache block (a page), the per-channel min and
max of its keys. For a query q, sum_c max(q_c * kmax_c, q_c * kmin_c) is at least q . k for every
key k in the page: each channel's term takes whichever end of the key's range q_c pushes up. A
decode step scores every page this way and reads only the top ones, so the scoring must cost far
less than the attention it saves: it reads 2 * D numbers per page instead of block_size * D keys.

Grid (B, Hkv, cdiv(nb, BLOCK_N)): one program loads its kv-head's `group` query heads once, then
one tile of BLOCK_N pages' bounds through the block table, and forms all [BLOCK_G, BLOCK_N]
bounds in one 3-D broadcast (no tl.dot: the max per channel is not a matrix product). The page
keeps the largest of its query heads' bounds, since one selection serves the whole GQA group.
float32 throughout.

Unlike the reference, which reads block 0 for them, -1 table entries (no page) score -inf: they
then never rank, and the kernel skips their loads. Callers ignore those entries either way.
"""

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 8192  # BLOCK_G * BLOCK_N * BLOCK_D per program: bounds the 3-D tile's registers


@triton.jit
def _page_scores_kernel(q_ptr, kmin_ptr, kmax_ptr, tables_ptr, out_ptr, s_kmin, s_kmax, nb, group,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    head = b * tl.num_programs(1) + h
    g, d, n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), t * BLOCK_N + tl.arange(0, BLOCK_N)
    g_ok, d_ok, n_ok = g < group, d < D, n < nb
    # padded channels load 0 in q, so they add max(0, 0) = 0 to every bound
    q = tl.load(q_ptr + (head * group + g)[:, None] * D + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    block = tl.load(tables_ptr + head * nb + n, mask=n_ok, other=-1)
    held = block >= 0
    mask = held[:, None] & d_ok[None, :]
    low = tl.load(kmin_ptr + block[:, None] * s_kmin + d[None, :], mask=mask, other=0.0).to(tl.float32)
    high = tl.load(kmax_ptr + block[:, None] * s_kmax + d[None, :], mask=mask, other=0.0).to(tl.float32)
    qb = q[:, None, :]                                                        # [BLOCK_G, 1, BLOCK_D]
    bound = tl.sum(tl.maximum(qb * high[None, :, :], qb * low[None, :, :]), axis=2)  # [BLOCK_G, BLOCK_N]
    bound = tl.where(g_ok[:, None], bound, float("-inf"))  # padded heads must not win the max
    score = tl.where(held, tl.max(bound, axis=0), float("-inf"))
    tl.store(out_ptr + head * nb + n, score, mask=n_ok)


def page_scores(q, kmin, kmax, tables, block_n=None):
    """q [B, Hq, D]; kmin, kmax [num_blocks, D] (pool dtype; may be strided views, rows of a wider
    tensor, with stride(-1) == 1); tables [B, Hkv, nb] int64 block ids (-1: no page) -> float32
    [B, Hkv, nb], each page's bound, the largest over its kv-head's query heads; -inf at -1 entries.
    block_n: pages per program (default: as many as fit TILE_ELEMENTS, at most 64)."""
    B, Hq, D = q.shape
    Hkv, nb = tables.shape[1], tables.shape[2]
    group = Hq // Hkv
    assert Hq == Hkv * group and tables.shape[0] == B and kmin.shape[-1] == kmax.shape[-1] == D
    assert kmin.stride(-1) == 1 and kmax.stride(-1) == 1, "channels must be contiguous"
    q, tables = q.contiguous(), tables.contiguous()
    out = torch.empty((B, Hkv, nb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(D)
    block_n = block_n or min(64, max(2, TILE_ELEMENTS // (block_g * block_d)))
    _page_scores_kernel[(B, Hkv, triton.cdiv(nb, block_n))](
        q, kmin, kmax, tables, out, kmin.stride(0), kmax.stride(0), nb, group,
        D=D, BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=block_d)
    return out
