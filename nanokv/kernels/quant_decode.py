"""Decode attention over a quantized KV cache in Triton: the twin of
`reference.quantized_decode_attention`.

Each (sequence, kv-head) holds its oldest tokens in quantized blocks (KIVI's layout, see
nanokv/kernels/quant.py: b-bit codes packed along the head dimension, a float16 scale and zero point per
group) and its newest ones, the residual, in full-precision blocks. The reference dequantizes every
block to float32 before attending, as transformers' quantized caches do at every step: that writes
and rereads 16 / b times the bytes the codes hold, and decode is bound by exactly those bytes. Here
each tile of codes is dequantized in registers right after it is loaded (code * scale + zero), so
only the packed codes and their scales ever leave memory.

Layout as `paged_decode.py`, whose merge kernel this reuses: grid (B, Hkv, num_splits), one
program runs an online softmax for all `group` query heads of its kv-head over its split of the
tokens, float32 throughout, and writes a partial (acc, m, l); `_merge_kernel` combines the splits
by log-sum-exp. A split takes its share of each part: a run of quantized blocks, then a run of
full-precision blocks. Quantized tokens carry no positions (every one is older than the query);
full-precision slots are visible by position, as in paged_decode.

Every field is a strided view into one byte arena (nanokv/cache/quant_pool.py keeps all fields of
a block in one row), so a token is always addressed as block * row_stride + offset within the
block, never as a flat index across blocks.
"""

import math

import torch
import triton
import triton.language as tl

from nanokv.kernels.paged_decode import MAX_SPLITS, MIN_SPLIT_TOKENS, _merge_kernel


@triton.jit
def _dequantize(codes_ptr, scale_ptr, zero_ptr, block, row, held, d, d_ok, s_codes, s_scale,
                D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """float32 [tokens, BLOCK_D] of tokens `row` of quantized blocks `block` (0 where not held)."""
    mask = held[:, None] & d_ok[None, :]
    # Channel c's code sits in byte c // (8 / BITS), at bit (c % (8 / BITS)) * BITS. Neighbouring
    # channels load the same byte: repeats of one cache line, served from L1, not from memory.
    byte = tl.load(codes_ptr + (block * s_codes + row * (D * BITS // 8))[:, None] + (d // (8 // BITS))[None, :],
                   mask=mask, other=0)
    code = (byte.to(tl.int32) >> ((d % (8 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)
    if PER_CHANNEL:  # KIVI keys: one scale per channel for each run of G tokens
        at = (block * s_scale + (row // G) * D)[:, None] + d[None, :]
    else:            # values (and per-token keys): one scale per token for each run of G channels
        at = (block * s_scale + row * (D // G))[:, None] + (d // G)[None, :]
    scale = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + at, mask=mask, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def _online_softmax(m, l, acc, scores, v):
    """Fold a tile of scores [BLOCK_G, N] (-inf where masked) and its values [N, BLOCK_D] in."""
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid -inf - -inf
    p = tl.exp(scores - m_ref[:, None])
    alpha = tl.exp(m - m_ref)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _split_kernel(q_ptr, q_pos_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, qtables_ptr, qlens_ptr,
                  k_ptr, v_ptr, pos_ptr, tables_ptr, lengths_ptr, acc_ptr, m_ptr, l_ptr,
                  s_codes, s_kscale, s_vscale, s_kv, s_pos, sm_scale, nq, nb, num_splits, q_split, f_split, group,
                  D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
                  KEYS_PER_CHANNEL: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    head = b * tl.num_programs(1) + h
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_ok, d_ok = g < group, d < D
    # float32 from here on (the interpreter gets half-precision dots wrong); the scale is folded into q
    q = tl.load(q_ptr + (head * group + g)[:, None] * D + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * sm_scale
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    # Quantized tokens: all visible, so only the count masks. Each token looks up its own block
    # (a tile may span several small blocks); -1 table entries past the count are never read.
    qlen = tl.minimum(tl.load(qlens_ptr + head).to(tl.int32), nq * R)
    lo = s * q_split
    hi = tl.minimum(lo + q_split, qlen)
    for start in range(lo, hi, BLOCK_Q):
        t = start + tl.arange(0, BLOCK_Q)
        held = t < hi
        block = tl.load(qtables_ptr + head * nq + t // R, mask=held, other=0)
        held = held & (block >= 0)
        row = t % R
        k = _dequantize(kc_ptr, ks_ptr, kz_ptr, block, row, held, d, d_ok, s_codes, s_kscale,
                        D, BITS, G, KEYS_PER_CHANNEL)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        scores = tl.where(held[None, :], scores, float("-inf"))
        v = _dequantize(vc_ptr, vs_ptr, vz_ptr, block, row, held, d, d_ok, s_codes, s_vscale, D, BITS, G, False)
        m, l, acc = _online_softmax(m, l, acc, scores, v)

    # The full-precision residual: visible by position, as in paged_decode.
    q_pos = tl.load(q_pos_ptr + b).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + head).to(tl.int32), nb * BLOCK_SIZE)
    lo = s * f_split
    hi = tl.minimum(lo + f_split, length)
    for start in range(lo, hi, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        held = slot < hi
        block = tl.load(tables_ptr + head * nb + slot // BLOCK_SIZE, mask=held, other=0)
        held = held & (block >= 0)
        offset = slot % BLOCK_SIZE
        pos = tl.load(pos_ptr + block * s_pos + offset, mask=held, other=0)
        visible = held & (pos <= q_pos)
        at = (block * s_kv + offset * D)[:, None] + d[None, :]
        kv_mask = held[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + at, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.where(visible[None, :], tl.dot(q, tl.trans(k), input_precision="ieee"), float("-inf"))
        v = tl.load(v_ptr + at, mask=kv_mask, other=0.0).to(tl.float32)
        m, l, acc = _online_softmax(m, l, acc, scores, v)

    part = (head * num_splits + s) * group + g  # scratch row of (b, h, s, g), as paged_decode's merge reads it
    tl.store(m_ptr + part, m, mask=g_ok)
    tl.store(l_ptr + part, l, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


def quantized_decode_attention(q, q_pos, quant, qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths,
                               num_splits=None):
    """q [B, Hq, D]; q_pos [B]; quant: QuantBlocks; qtables [B, Hkv, nq] int64 quantized block ids, oldest
    first (-1 past a head's blocks); qlens [B, Hkv] tokens held in them; k_pool, v_pool [num_blocks,
    block_size, D], pos_pool [num_blocks, block_size] int32, tables [B, Hkv, nb], lengths [B, Hkv]: the
    full-precision residual, as in paged_decode. Every field may be a strided view (rows of one arena).
    -> [B, Hq, D] in q's dtype. num_splits: programs per head (default: as paged_decode sizes them)."""
    B, Hq, D = q.shape
    Hkv, nq, nb = tables.shape[1], qtables.shape[2], tables.shape[2]
    group, block_size = Hq // Hkv, k_pool.shape[1]
    R, G, bits = quant.block_size, quant.group_size, quant.bits
    assert Hq == Hkv * group and qtables.shape[:2] == tables.shape[:2] and D % G == 0 and R % G == 0
    assert G & (G - 1) == 0, "the group size is a power of two (a tile of G tokens)"
    # inner dims contiguous; paired fields share a row stride, so one stride serves both
    for t in (quant.k_codes, quant.k_scale, quant.v_codes, quant.v_scale, k_pool, pos_pool):
        assert t.stride(-1) == 1 and (t.dim() < 3 or t.stride(1) == t.shape[2]), "inner dims must be contiguous"
    assert quant.k_codes.stride() == quant.v_codes.stride() and k_pool.stride() == v_pool.stride()
    assert quant.k_scale.stride() == quant.k_zero.stride() and quant.v_scale.stride() == quant.v_zero.stride()
    q, q_pos, qtables, qlens, tables, lengths = (t.contiguous() for t in (q, q_pos, qtables, qlens, tables, lengths))
    if num_splits is None:
        num_splits = min(MAX_SPLITS, max(1, math.ceil((nq * R + nb * block_size) / MIN_SPLIT_TOKENS)))
    # splits cut at block boundaries: a tile of G tokens is then one key group of one block
    q_split, f_split = math.ceil(nq / num_splits) * R, math.ceil(nb / num_splits) * block_size

    nan, f32 = float("nan"), torch.float32  # scratch starts as NaN: anything left unwritten shows
    acc = torch.full((B, Hkv, num_splits, group, D), nan, dtype=f32, device=q.device)
    m = torch.full((B, Hkv, num_splits, group), nan, dtype=f32, device=q.device)
    l = torch.full_like(m, nan)
    out = torch.full_like(q, nan)
    lse = torch.full((B, Hq), nan, dtype=f32, device=q.device)
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot's minimum tile side on a GPU
    block_d = max(16, triton.next_power_of_2(D))
    _split_kernel[(B, Hkv, num_splits)](
        q, q_pos, quant.k_codes, quant.k_scale, quant.k_zero, quant.v_codes, quant.v_scale, quant.v_zero,
        qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths, acc, m, l,
        quant.k_codes.stride(0), quant.k_scale.stride(0), quant.v_scale.stride(0), k_pool.stride(0),
        pos_pool.stride(0), 1.0 / math.sqrt(D), nq, nb, num_splits, q_split, f_split, group,
        D=D, BITS=bits, G=G, R=R, KEYS_PER_CHANNEL=quant.keys_per_channel, BLOCK_SIZE=block_size,
        BLOCK_Q=max(16, G), BLOCK_N=max(16, triton.next_power_of_2(block_size)), BLOCK_G=block_g, BLOCK_D=block_d)
    _merge_kernel[(B, Hkv)](acc, m, l, out, lse, num_splits, group, D=D, BLOCK_G=block_g, BLOCK_D=block_d)
    return out
