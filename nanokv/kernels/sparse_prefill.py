"""Triton block-sparse prefill: `kernels.reference.block_sparse_attention`, a prompt over its own
K/V computing only the (query tile, key tile) pairs a sparse-prefill method picks (MInference,
CritiPrefill: methods/base.py SparsePrefill).

FlashAttention over contiguous K/V. One program computes one query tile (TILE query tokens) of one
query head: it walks the key tiles 0 .. its own (the causal lower triangle), reads that head's bit
of the tile mask for each, and skips the tile without touching K or V when the bit is off, so the
work done is what the mask keeps. For the tiles it computes it keeps, per row, a running max m, a
running sum l of exp(score - m) and an accumulator of exp(score - m) @ V, rescaled whenever the max
grows (kernels/prefill.py's softmax_step, which the paged prefill runs too). Query heads of a group
read their kv-head's K/V (GQA); their masks may differ, so each query head is a program of its own
rather than rows of one tile. Scores in base 2 (the scale folded with log2(e), then exp2).

Tiles stay in the prompt's dtype on tensor cores with float32 accumulators; a float32 prompt and
the interpreter take float32 tiles and exact dots (launch.exact_dots). TILE is the method's tile
size: a power of two of at least 16 (tl.dot's least); smaller tiles go to the plain-torch twin
(kernels/__init__.py).
"""

import math

import torch
import triton
import triton.language as tl

from nanokv.kernels.launch import exact_dots
from nanokv.kernels.prefill import softmax_step

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_prefill_kernel(Q, K, V, Mask, Out, T, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_ot, stride_oh, stride_mh, stride_mi, qk_scale,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                           UPCAST: tl.constexpr):
    i, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // GROUP
    rows = i * TILE + tl.arange(0, TILE)
    row_ok = rows < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, BLOCK_D], tl.float32)
    for j in range(0, i + 1):
        if tl.load(Mask + head * stride_mh + i * stride_mi + j) != 0:  # a tile the method skips costs one load
            cols = j * TILE + tl.arange(0, TILE)
            col_ok = cols < T
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + cols[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            visible = col_ok[None, :] & (cols[None, :] <= rows[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, UPCAST)
    # every row sees itself where the diagonal tile is kept (SparsePrefill.tile_mask keeps it)
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_mask: torch.Tensor,
                           tile: int) -> torch.Tensor:
    """q [T, Hq, D], k, v [T, Hkv, D] (one prompt, in order), tile_mask [Hq, nq, nk] bool with
    nq = nk = ceil(T / tile), tile a power of two >= 16 -> [T, Hq, D] in q's dtype."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0, "query heads must be a multiple of kv-heads (GQA)"
    assert tile >= 16 and tile & (tile - 1) == 0, "the tile must be a power of two >= 16"
    n = -(-T // tile)
    assert tile_mask.shape == (Hq, n, n), f"tile_mask {tuple(tile_mask.shape)} is not [{Hq}, {n}, {n}]"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    mask = tile_mask.to(torch.int8).contiguous()
    out = torch.empty_like(q)
    if T == 0:
        return out
    _sparse_prefill_kernel[(n, Hq)](
        q, k, v, mask, out, T, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), mask.stride(0), mask.stride(1), LOG2E / math.sqrt(D),
        GROUP=Hq // Hkv, HEAD_DIM=D, TILE=tile, BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=exact_dots(k.dtype) or q.dtype != k.dtype)
    return out
