"""Triton prefill attention over the paged, per-head KV cache: `kernels.reference.paged_attention`
for many query tokens of several sequences, in one launch.

FlashAttention over paged keys. One program computes a tile of query rows of one sequence for one
kv-head, and the GQA group is folded into the tile's rows: row r is query token r // GROUP_P of
the tile, query head r % GROUP_P of the kv-head's group (GROUP_P: the group rounded up to a power
of two; the extra rows are masked). So each key tile, loaded once, serves every query head that
reads it, and the dots are [BLOCK_M, D] x [D, BLOCK_N] with BLOCK_M = 128 rows, the shape tensor
cores want. The program walks the held slots of its kv-head, BLOCK_N slots at a time, finding each
slot through the block table, and keeps per row a running max m, a running sum l of
exp(score - m) and an accumulator of exp(score - m) @ V, rescaled by exp(m_old - m_new) whenever
the max grows; out = acc / l at the end. The score matrix is never materialized. Scores are taken
in base 2 (the scale folded with log2(e), then exp2), the GPU's native exponential.

Tiles stay in the cache's dtype (bf16/fp16) on tensor cores with float32 accumulators; a float32
cache and the interpreter take float32 tiles and exact dots (launch.exact_dots). A key tile no
row of the query tile can see (later positions: the causal upper triangle; or outside the
window) is skipped after reading its positions alone, so a causal prefill does half the work.

Masks come from stored positions, as in the reference: slot i of (b, h) is visible to a query at
position p iff i < lengths[b, h], pos <= p and (no window or p - pos < window).

A fresh prompt (no cached prefix) does not need this kernel: its K/V are contiguous in hand, and
kernels/__init__.py sends it to torch's fused attention (SDPA), which on a GPU is FlashAttention.
"""

import math

import torch
import triton
import triton.language as tl

from nanokv.kernels.launch import INTERPRETED, exact_dots

LOG2E = 1.4426950408889634
BLOCK_M = 128       # rows of a query tile (tokens x padded group); 64 for float32 tiles
EXACT_BLOCK_M = 64
# (BLOCK_N, warps, stages) the GPU autotunes over, per head_dim and group. For sm_90 at D=128 in
# bf16 (scripts/compile_kernels.py -v): 32 slots over 8 warps take 254 registers and spill nothing;
# 64 spill ~200 B, kept as a candidate since its larger dots may still win; 4 warps spill KiBs.
# The interpreter runs the first (nothing to time there).
CONFIGS = [(32, 8, 2), (32, 8, 3), (64, 8, 2)]


def _configs():
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in CONFIGS]
    return configs[:1] if INTERPRETED else configs


@triton.jit
def _slot_scores(q, q_pos, q_lo, q_hi, first, length, table, K, Pos, stride_kv, stride_pos, window, qk_scale, d, d_ok,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Scores [BLOCK_M, BLOCK_N] in base 2 of the query tile against slots first .. first + BLOCK_N - 1
    of one kv-head (-inf where not visible), their element offsets in the K and V pools, and which
    are held. `seen`: whether any row sees any of them (if not, K was not loaded)."""
    # BLOCK_N slots (a power of two, at least the 16 rows tl.dot needs) may span several cache
    # blocks, or parts of them (a quantized pool's residual blocks hold any number of tokens):
    # each slot finds its block through the table.
    slot = first + tl.arange(0, BLOCK_N)
    held = slot < length
    block = tl.load(table + slot // BLOCK_SIZE, mask=held, other=-1)
    held = held & (block >= 0)  # never read through a -1 entry, whatever the lengths say
    # A block is a row of the pool, possibly strided (a quantized pool's full-precision blocks are
    # views of its rows); within it, slots are contiguous [D] rows.
    block, offset = block.to(tl.int64), slot % BLOCK_SIZE
    kv = block * stride_kv + offset * HEAD_DIM
    k_pos = tl.load(Pos + block * stride_pos + offset, mask=held, other=0)
    # the tile sees a slot iff some row's position admits it: skip the tile's K/V otherwise
    seen = held & (k_pos <= q_hi)
    if HAS_WINDOW:
        seen = seen & (q_lo - k_pos < window)
    s = tl.zeros([q.shape[0], BLOCK_N], tl.float32)
    if tl.max(seen.to(tl.int32), axis=0) > 0:
        # Slots past a length are never loaded, so whatever they hold cannot leak in.
        k = tl.load(K + kv[:, None] + d[None, :], mask=held[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
    visible = seen[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
    return tl.where(visible, s * qk_scale, float("-inf")), kv, held, seen


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """One tile of FlashAttention's online softmax: scores s [M, N] (base 2, -inf where a key is
    hidden) and values v [N, D] folded into each row's running max m, sum l and accumulator acc
    (rescaled as the max grows) -> (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead, so that
    # exp(-inf - -inf) = NaN never appears (its p and alpha are then exp(-inf) = 0).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "GROUP"], reset_to_zero=["ColSums"])
@triton.jit
def _prefill_kernel(Q, QPos, K, V, Pos, Tables, Lengths, Out, TileSeq, TileStart, CuSeqlens, ColSums,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, stride_th, stride_lb, stride_lh,
                    stride_kv, stride_pos,
                    num_table_blocks, num_q_heads, qk_scale, window, obs_window,
                    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_OBS: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = tl.load(TileSeq + tile)
    r = tl.arange(0, BLOCK_M)
    rows, g = tl.load(TileStart + tile) + r // GROUP_P, r % GROUP_P  # query token, head in the group
    head = kv_head * GROUP + g
    end = tl.load(CuSeqlens + seq + 1)
    row_ok = (rows < end) & (g < GROUP)  # the last tile of a sequence is partly padding
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM  # a constant (all true) when HEAD_DIM is a power of two: loads then vectorize
    q_at = rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(Q + q_at, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPos + rows, mask=row_ok, other=0)
    q_hi = tl.max(tl.where(row_ok, q_pos, -1), axis=0)
    q_lo = tl.min(tl.where(row_ok, q_pos, q_hi), axis=0)

    # A length past the table's capacity would index beyond the table row: clamp it.
    length = tl.minimum(tl.load(Lengths + seq * stride_lb + kv_head * stride_lh), num_table_blocks * BLOCK_SIZE)
    table = Tables + seq * stride_tb + kv_head * stride_th
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for first in range(0, length, BLOCK_N):
        s, kv, held, seen = _slot_scores(q, q_pos, q_lo, q_hi, first, length, table, K, Pos, stride_kv, stride_pos,
                                         window, qk_scale, d, d_ok, HEAD_DIM, BLOCK_SIZE, HAS_WINDOW, BLOCK_N, UPCAST)
        if tl.max(seen.to(tl.int32), axis=0) > 0:
            v = tl.load(V + kv[:, None] + d[None, :], mask=held[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, UPCAST)

    # l = 0 only on rows that saw no key: padding rows (not stored) and, never in a real
    # prefill (a query sees itself), a query with nothing visible, which gets zeros.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    if HAS_OBS:
        # Column sums of the last obs_window queries' probabilities need each row's final max
        # and sum, known only once every key is read: tiles holding such rows recompute their
        # scores (FlashAttention's backward does the same), the others pay nothing. Tiles of one
        # sequence add into the same columns, hence atomics.
        obs = row_ok & (rows >= end - obs_window)
        if tl.max(obs.to(tl.int32), axis=0) > 0:
            m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows that saw nothing: no NaN
            heads = kv_head * GROUP + tl.arange(0, GROUP_P)
            S = num_table_blocks * BLOCK_SIZE
            col = ColSums + (seq * num_q_heads + heads)[:, None] * S
            for first in range(0, length, BLOCK_N):
                s, kv, held, seen = _slot_scores(q, q_pos, q_lo, q_hi, first, length, table, K, Pos, stride_kv,
                                                 stride_pos, window, qk_scale, d, d_ok, HEAD_DIM, BLOCK_SIZE,
                                                 HAS_WINDOW, BLOCK_N, UPCAST)
                p = tl.where(obs[:, None], tl.exp2(s - m_fin[:, None]) / l_i[:, None], 0.0)
                # rows are (token, head): sum over the tile's tokens, per query head
                per_head = tl.sum(tl.reshape(p, [BLOCK_M // GROUP_P, GROUP_P, BLOCK_N]), axis=0)
                slot = first + tl.arange(0, BLOCK_N)
                tl.atomic_add(col + slot[None, :], per_head,
                              mask=(tl.arange(0, GROUP_P) < GROUP)[:, None] & (held & seen)[None, :])


def query_tiles(cu_seqlens: torch.Tensor, tokens: int):
    """The grid's tile -> (sequence, first row) map. Tiles never straddle two sequences (a tile
    shares one block table), so sequence b gets ceil(len_b / tokens) tiles of its own, starting
    at rows cu_seqlens[b], cu_seqlens[b] + tokens, ...; its last tile is masked past
    cu_seqlens[b + 1]. Built with tensor ops on cu_seqlens' device; the tile count is read back
    to size the grid (one small host sync per call)."""
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles_per_seq = (seq_lens + tokens - 1) // tokens
    num_tiles = int(tiles_per_seq.sum())
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=cu_seqlens.device), tiles_per_seq,
                                  output_size=num_tiles)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq  # index of each sequence's first tile
    index_in_seq = torch.arange(num_tiles, device=cu_seqlens.device) - first_tile[seq]
    start = cu_seqlens.long()[seq] + index_in_seq * tokens
    return seq.to(torch.int32), start.to(torch.int32)


def prefill_attention(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None,
                      out=None, obs_window=None, block_m=None):
    """q [total_T, Hq, D]: the new tokens' queries of B sequences, concatenated; q_pos [total_T] int
    their positions; cu_seqlens [B + 1] int32 query offsets (sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b+1]); k_pool, v_pool [num_blocks, block_size, D]; pos_pool
    [num_blocks, block_size] int32; tables [B, Hkv, nb] int64 block ids, -1 past a head's blocks;
    lengths [B, Hkv] tokens held per head (the new chunk is already written into the cache, after
    any cached prefix). -> out [total_T, Hq, D] in q's dtype (written into `out` if given).
    With `obs_window` W, also column sums [B, Hq, nb * block_size] float32: per slot of each head's
    table, the attention probability it received summed over the sequence's last W queries (0 where
    never visible); W >= the chunk length sums over every query. `block_m`: rows per query tile
    (query tokens x the group rounded up to a power of two; default BLOCK_M, or EXACT_BLOCK_M for
    float32 tiles).
    """
    total_t, num_q_heads, head_dim = q.shape
    block_size = k_pool.shape[1]
    batch, num_kv_heads, num_table_blocks = tables.shape
    assert num_q_heads % num_kv_heads == 0, "query heads must be a multiple of kv-heads (GQA)"
    assert len(cu_seqlens) == batch + 1 and len(q_pos) == total_t
    # A block may sit anywhere (a quantized pool's blocks are strided views of its rows), but its
    # slots must be contiguous [D] rows: asserted, as copying a pool per call would cost more than
    # the attention. K and V share one block stride. q and out only need unit stride along D.
    assert k_pool.stride(-1) == 1 and k_pool.stride(1) == head_dim and pos_pool.stride(-1) == 1
    assert v_pool.stride() == k_pool.stride(), "K and V pools share their strides"
    q_pos, tables = q_pos.contiguous(), tables.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    group = num_q_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    upcast = exact_dots(k_pool.dtype) or q.dtype != k_pool.dtype
    block_m = max(block_m or (EXACT_BLOCK_M if upcast else BLOCK_M), 16, group_p)
    tile_seq, tile_start = query_tiles(cu_seqlens, block_m // group_p)
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    col_sums = None
    if obs_window is not None:
        col_sums = torch.zeros(batch, num_q_heads, num_table_blocks * block_size, device=q.device)
    if len(tile_seq) == 0:
        return out if obs_window is None else (out, col_sums)
    _prefill_kernel[(len(tile_seq), num_kv_heads)](
        q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, out, tile_seq, tile_start, cu_seqlens, col_sums,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), tables.stride(1),
        lengths.stride(0), lengths.stride(1), k_pool.stride(0), pos_pool.stride(0),
        num_table_blocks, num_q_heads, LOG2E / math.sqrt(head_dim), sliding_window or 0, obs_window or 0,
        HEAD_DIM=head_dim, GROUP=group, GROUP_P=group_p, BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None,
        HAS_OBS=obs_window is not None, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    return out if obs_window is None else (out, col_sums)
