"""Triton prefill attention over the paged, per-head KV cache: `kernels.reference.paged_attention`
for many query tokens of several sequences, in one launch.

One program computes a tile of BLOCK_M consecutive query rows of one sequence for one query head
(FlashAttention): it walks the held slots of that head's kv-head, BLOCK_N slots at a time, finding
each slot through the block table, and keeps per row a running max m, a running sum l of
exp(score - m) and an accumulator of exp(score - m) @ V, rescaled by exp(m_old - m_new) whenever
the max grows; out = acc / l at the end. The score matrix is never materialized.

Masks come from stored positions, as in the reference: slot i of (b, h) is visible to a query at
position p iff i < lengths[b, h], pos <= p and (no window or p - pos < window).
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _slot_scores(q, q_pos, first, length, table, K, Pos, stride_kv, stride_pos, head_dim, window, d, d_ok,
                 BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores [BLOCK_M, BLOCK_N] of the query tile against slots first .. first + BLOCK_N - 1 of
    one kv-head (-inf where not visible), their element offsets in the K and V pools, and which
    are held."""
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
    kv = block * stride_kv + offset * head_dim
    # Slots past a length are never loaded, so whatever they hold cannot leak in.
    k = tl.load(K + kv[:, None] + d[None, :], mask=held[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    k_pos = tl.load(Pos + block * stride_pos + offset, mask=held, other=0)
    visible = held[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.where(visible, s, float("-inf")), kv, held


@triton.jit
def _prefill_kernel(Q, QPos, K, V, Pos, Tables, Lengths, Out, TileSeq, TileStart, CuSeqlens, ColSums,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, stride_th, stride_lb, stride_lh,
                    stride_kv, stride_pos,
                    num_table_blocks, head_dim, scale, window, obs_window,
                    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_OBS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tile, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // GROUP  # GQA: query heads kv_head*GROUP .. kv_head*GROUP + GROUP-1 share it
    seq = tl.load(TileSeq + tile)
    rows = tl.load(TileStart + tile) + tl.arange(0, BLOCK_M)
    end = tl.load(CuSeqlens + seq + 1)
    row_ok = rows < end  # the last tile of a sequence is partly padding
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim

    # Loaded tiles are upcast to float32: all maths below is float32 (and the interpreter gets
    # tl.dot and half-precision arithmetic wrong otherwise). The scale is folded into q once.
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    q_pos = tl.load(QPos + rows, mask=row_ok, other=0)

    # A length past the table's capacity would index beyond the table row: clamp it.
    length = tl.minimum(tl.load(Lengths + seq * stride_lb + kv_head * stride_lh), num_table_blocks * BLOCK_SIZE)
    table = Tables + seq * stride_tb + kv_head * stride_th
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for first in range(0, length, BLOCK_N):
        s, kv, held = _slot_scores(q, q_pos, first, length, table, K, Pos, stride_kv, stride_pos, head_dim,
                                   window, d, d_ok, BLOCK_SIZE, HAS_WINDOW, BLOCK_N)
        v = tl.load(V + kv[:, None] + d[None, :], mask=held[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead, so that
        # exp(-inf - -inf) = NaN never appears (its p and alpha are then exp(-inf) = 0).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_sub)
        p = tl.exp(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    # l = 0 only on rows that saw no key: padding rows (not stored) and, never in a real
    # prefill (a query sees itself), a query with nothing visible, which gets zeros.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    if HAS_OBS:
        # Column sums of the last obs_window queries' probabilities need each row's final max
        # and sum, so a second pass recomputes the scores: only tiles holding such rows pay.
        # Tiles of one sequence add into the same columns, hence atomics.
        obs = row_ok & (rows >= end - obs_window)
        if tl.max(obs.to(tl.int32), axis=0) > 0:
            m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows that saw nothing: no NaN
            col = ColSums + (seq * tl.num_programs(1) + head) * num_table_blocks * BLOCK_SIZE
            for first in range(0, length, BLOCK_N):
                s, kv, held = _slot_scores(q, q_pos, first, length, table, K, Pos, stride_kv, stride_pos,
                                           head_dim, window, d, d_ok, BLOCK_SIZE, HAS_WINDOW, BLOCK_N)
                p = tl.where(obs[:, None], tl.exp(s - m_fin[:, None]) / l_i[:, None], 0.0)
                tl.atomic_add(col + first + tl.arange(0, BLOCK_N), tl.sum(p, axis=0), mask=held)


def query_tiles(cu_seqlens: torch.Tensor, block_m: int):
    """The grid's tile -> (sequence, first row) map. Tiles never straddle two sequences (a tile
    shares one block table), so sequence b gets ceil(len_b / block_m) tiles of its own, starting
    at rows cu_seqlens[b], cu_seqlens[b] + block_m, ...; its last tile is masked past
    cu_seqlens[b + 1]. Built with tensor ops on cu_seqlens' device; the tile count is read back
    to size the grid (one small host sync per call)."""
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tiles_per_seq = (seq_lens + block_m - 1) // block_m
    num_tiles = int(tiles_per_seq.sum())
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=cu_seqlens.device), tiles_per_seq,
                                  output_size=num_tiles)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq  # index of each sequence's first tile
    index_in_seq = torch.arange(num_tiles, device=cu_seqlens.device) - first_tile[seq]
    start = cu_seqlens.long()[seq] + index_in_seq * block_m
    return seq.to(torch.int32), start.to(torch.int32)


def prefill_attention(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None,
                      out=None, obs_window=None, block_m=64):
    """q [total_T, Hq, D]: the new tokens' queries of B sequences, concatenated; q_pos [total_T] int
    their positions; cu_seqlens [B + 1] int32 query offsets (sequence b owns rows
    cu_seqlens[b]:cu_seqlens[b+1]); k_pool, v_pool [num_blocks, block_size, D]; pos_pool
    [num_blocks, block_size] int32; tables [B, Hkv, nb] int64 block ids, -1 past a head's blocks;
    lengths [B, Hkv] tokens held per head (the new chunk is already written into the cache, after
    any cached prefix). -> out [total_T, Hq, D] in q's dtype (written into `out` if given).
    With `obs_window` W, also column sums [B, Hq, nb * block_size] float32: per slot of each head's
    table, the attention probability it received summed over the sequence's last W queries (0 where
    never visible); W >= the chunk length sums over every query. `block_m`: query rows per program
    (16 at least, for tl.dot; larger tiles read each key for more queries).
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
    tile_seq, tile_start = query_tiles(cu_seqlens, block_m)
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    col_sums = None
    if obs_window is not None:
        col_sums = torch.zeros(batch, num_q_heads, num_table_blocks * block_size, device=q.device)
    if len(tile_seq) == 0:
        return out if obs_window is None else (out, col_sums)
    grid = (len(tile_seq), num_q_heads)
    _prefill_kernel[grid](
        q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, out, tile_seq, tile_start, cu_seqlens, col_sums,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), tables.stride(1),
        lengths.stride(0), lengths.stride(1), k_pool.stride(0), pos_pool.stride(0),
        num_table_blocks, head_dim, 1.0 / math.sqrt(head_dim), sliding_window or 0, obs_window or 0,
        GROUP=num_q_heads // num_kv_heads, BLOCK_SIZE=block_size, HAS_WINDOW=sliding_window is not None,
        HAS_OBS=obs_window is not None,
        BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(block_size)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    return out if obs_window is None else (out, col_sums)
