"""Decode attention over a quantized KV cache in Triton: the twin of
`reference.quantized_decode_attention`.

Each (sequence, kv-head) holds its oldest tokens in quantized blocks (KIVI's layout, see
nanokv/kernels/quant.py: b-bit codes packed along the head dimension, K and V each at their own b,
a float16 scale and zero point per group) and its newest ones, the residual, in full-precision
blocks. The reference dequantizes every block to float32 before attending, as transformers'
quantized caches do at every step: that writes and rereads 16 / b times the bytes the codes hold,
and decode is bound by exactly those bytes. Here
each tile of codes is dequantized in registers right after it is loaded (code * scale + zero), so
only the packed codes and their scales ever leave memory: at 4 bits and D=128, 160 bytes a token
(K and V) against bfloat16's 512.

Layout as `paged_decode.py`, whose merge kernel this reuses: grid (B, Hkv, num_splits), one
program runs an online softmax for all `group` query heads of its kv-head over its split of the
tokens and writes a partial (acc, m, l) in float32; `_merge_kernel` combines the splits by
log-sum-exp. The splits (split-K) are sized from the batch and the SM count (launch.split_count)
and cut at block boundaries: a split takes a run of quantized blocks, then a run of
full-precision blocks. Quantized tokens carry no positions (every one is older than the query);
full-precision slots are visible by position, as in paged_decode.

Tiles (`tiling`): a step takes up to 128 tokens, a power of two that divides the quantized block
size, so a tile of codes is one run of rows in one block (contiguous unless the rows sit in wider
ones), loaded once and unpacked
in registers (a byte holds 8 / b channels), and spans several key groups, whose scales are
loaded once per group. The dequantized tiles take q's dtype and meet q on tensor cores, float32
accumulation (launch.exact_dots: a float32 cache, and the interpreter, keep float32 tiles and exact
dots); the softmax scale is folded into q. The next tile's loads are in flight while this one is
dequantized (num_stages).

Every field is a strided view into one byte arena (nanokv/cache/quant_pool.py keeps all fields of
a block in one row), so a token is always addressed as block * row_stride + offset within the
block, never as a flat index across blocks.
"""

import math

import torch
import triton
import triton.language as tl

from nanokv.kernels.launch import exact_dots, split_count
from nanokv.kernels.paged_decode import _dot, _merge_kernel, _online_softmax

TILE = 8192  # elements of a [tokens, head dim] tile of K or V (scripts/compile_kernels.py: no spills)


def tiling(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(tokens a step, pipeline stages, warps) for a cache of `dtype`. Half precision: tiles of
    TILE elements (128 tokens of D=64, 64 of D=128) on tensor cores, two stages; 4 warps issue
    fewer instructions a token than 8 (the dequantization is most of them). Float32 dots run on
    CUDA cores with whole operands in registers: 16 tokens (tl.dot's smallest tile), one stage,
    8 warps."""
    if dtype == torch.float32:
        return 16, 1, 8
    return min(128, max(16, TILE // block_d)), 2, 4


@triton.jit
def _unpack(byte, BITS: tl.constexpr):
    """int32 codes [tokens, n * 8 / BITS] of bytes [tokens, n]: a byte holds 8 / BITS neighbouring
    channels, the first in its lowest bits, so the codes of each bit offset are interleaved."""
    byte = byte.to(tl.int32)
    if BITS == 4:
        byte = tl.interleave(byte & 15, byte >> 4)
    elif BITS == 2:  # channels 4i, 4i+2 then 4i+1, 4i+3 of byte i, interleaved twice
        byte = tl.interleave(tl.interleave(byte & 3, (byte >> 4) & 3), tl.interleave((byte >> 2) & 3, byte >> 6))
    return byte


@triton.jit
def _dequantize(codes_ptr, scale_ptr, zero_ptr, block, row, count, s_codes, s_row, s_scale, D: tl.constexpr,
                BITS: tl.constexpr, G: tl.constexpr, PER_CHANNEL: tl.constexpr, TOKENS: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """float32 [TOKENS, BLOCK_D]: rows row.. of quantized block `block`, the first `count` of
    them held (0 past them); a row's D * BITS / 8 bytes start s_row apart."""
    t = tl.arange(0, TOKENS)
    # the tile's codes are TOKENS rows of D * BITS / 8 bytes (one contiguous run unless the rows sit
    # in wider ones): each byte is loaded once, and unpacked in registers
    c = tl.arange(0, BLOCK_D * BITS // 8)
    byte = tl.load(codes_ptr + block * s_codes + (row + t)[:, None] * s_row + c[None, :],
                   mask=(t < count)[:, None] & (c < D * BITS // 8)[None, :], other=0)
    code = _unpack(byte, BITS)
    # Scales and zero points are loaded once per group and spread in registers over its G tokens
    # (keys per channel) or its G channels (per token).
    if PER_CHANNEL:  # KIVI keys: one scale per channel for each run of G tokens; the tile starts a run
        RUN: tl.constexpr = G if G < TOKENS else TOKENS
        first, d = tl.arange(0, TOKENS // RUN) * RUN, tl.arange(0, BLOCK_D)
        at = ((row + first) // G)[:, None] * D + d[None, :]
        mask = (first < count)[:, None] & (d < D)[None, :]
        spread: tl.constexpr = (TOKENS // RUN, RUN, BLOCK_D)
    else:            # values (and per-token keys): one scale per token for each run of G channels
        j = tl.arange(0, BLOCK_D // G)
        at = (row + t)[:, None] * (D // G) + j[None, :]
        mask = (t < count)[:, None] & (j < D // G)[None, :]
        spread: tl.constexpr = (TOKENS, BLOCK_D // G, G)
    scale = tl.load(scale_ptr + block * s_scale + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + block * s_scale + at, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        scale, zero = tl.broadcast_to(scale[:, None, :], spread), tl.broadcast_to(zero[:, None, :], spread)
    else:
        scale, zero = tl.broadcast_to(scale[:, :, None], spread), tl.broadcast_to(zero[:, :, None], spread)
    scale, zero = tl.reshape(scale, (TOKENS, BLOCK_D)), tl.reshape(zero, (TOKENS, BLOCK_D))
    return code.to(tl.float32) * scale + zero


@triton.jit
def _split_kernel(q_ptr, q_pos_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, qtables_ptr, qlens_ptr,
                  k_ptr, v_ptr, pos_ptr, tables_ptr, lengths_ptr, acc_ptr, m_ptr, l_ptr,
                  s_kcodes, s_krow, s_vcodes, s_vrow, s_kscale, s_vscale, s_kv, s_pos, sm_scale, nq, nb,
                  num_splits, q_split, f_split, group, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
                  G: tl.constexpr, R: tl.constexpr, KEYS_PER_CHANNEL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    head = b * tl.num_programs(1) + h
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_ok, d_ok = g < group, d < D
    # The scale is folded into q in float32; tiles then take q's dtype (float32 when upcast).
    q = tl.load(q_ptr + (head * group + g)[:, None] * D + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * sm_scale
    if not UPCAST:
        q = q.to(q_ptr.dtype.element_ty)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    # Quantized tokens: all visible, so only the count masks.
    qlen = tl.minimum(tl.load(qlens_ptr + head).to(tl.int32), nq * R)
    lo = s * q_split
    hi = tl.minimum(lo + q_split, qlen)
    for start in tl.range(lo, hi, BLOCK_Q, num_stages=NUM_STAGES):
        block = tl.load(qtables_ptr + head * nq + start // R)  # a tile lies in one block (BLOCK_Q divides R)
        row, count = start % R, hi - start
        k = _dequantize(kc_ptr, ks_ptr, kz_ptr, block, row, count, s_kcodes, s_krow, s_kscale,
                        D, K_BITS, G, KEYS_PER_CHANNEL, BLOCK_Q, BLOCK_D).to(q.dtype)
        held = tl.arange(0, BLOCK_Q) < count
        scores = tl.where(held[None, :], _dot(q, tl.trans(k), UPCAST), float("-inf"))
        v = _dequantize(vc_ptr, vs_ptr, vz_ptr, block, row, count, s_vcodes, s_vrow, s_vscale,
                        D, V_BITS, G, False, BLOCK_Q, BLOCK_D).to(q.dtype)
        m, l, acc = _online_softmax(m, l, acc, scores, v, UPCAST)

    # The full-precision residual: visible by position, as in paged_decode.
    q_pos = tl.load(q_pos_ptr + b).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + head).to(tl.int32), nb * BLOCK_SIZE)
    lo = s * f_split
    hi = tl.minimum(lo + f_split, length)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        slot = start + tl.arange(0, BLOCK_N)
        held = slot < hi
        block = tl.load(tables_ptr + head * nb + slot // BLOCK_SIZE, mask=held, other=0)
        held = held & (block >= 0)
        offset = slot % BLOCK_SIZE
        pos = tl.load(pos_ptr + block * s_pos + offset, mask=held, other=0)
        visible = held & (pos <= q_pos)
        at = (block * s_kv + offset * D)[:, None] + d[None, :]
        kv_mask = held[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + at, mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.where(visible[None, :], _dot(q, tl.trans(k), UPCAST), float("-inf"))
        v = tl.load(v_ptr + at, mask=kv_mask, other=0.0).to(q.dtype)
        m, l, acc = _online_softmax(m, l, acc, scores, v, UPCAST)

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
    -> [B, Hq, D] in q's dtype. num_splits: programs per head (default: launch.split_count)."""
    B, Hq, D = q.shape
    Hkv, nq, nb = tables.shape[1], qtables.shape[2], tables.shape[2]
    group, block_size = Hq // Hkv, k_pool.shape[1]
    R, G = quant.block_size, quant.group_size
    assert Hq == Hkv * group and qtables.shape[:2] == tables.shape[:2] and D % G == 0 and R % G == 0
    assert G & (G - 1) == 0, "the group size is a power of two (a tile of G tokens)"
    assert quant.k_codes.shape[2] * 8 == D * quant.k_bits and quant.v_codes.shape[2] * 8 == D * quant.v_bits
    # inner dims contiguous (a row of codes may sit in a wider one: the codes pass their own strides);
    # paired fields share a row stride, so one stride serves both
    for t in (quant.k_scale, quant.v_scale, k_pool, pos_pool):
        assert t.stride(-1) == 1 and (t.dim() < 3 or t.stride(1) == t.shape[2]), "inner dims must be contiguous"
    assert quant.k_codes.stride(-1) == quant.v_codes.stride(-1) == 1, "a code row's bytes are contiguous"
    assert k_pool.stride() == v_pool.stride()
    assert quant.k_scale.stride() == quant.k_zero.stride() and quant.v_scale.stride() == quant.v_zero.stride()
    q, q_pos, qtables, qlens, tables, lengths = (t.contiguous() for t in (q, q_pos, qtables, qlens, tables, lengths))
    num_splits = num_splits or split_count(B * Hkv, nq * R + nb * block_size, q.device)
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
    tokens, stages, warps = tiling(q.dtype, block_d)
    block_q = min(tokens, R & -R)  # a power of two that divides R: a tile lies in one quantized block
    assert block_q >= 16, "quantized blocks of a multiple of 16 tokens (tl.dot's smallest tile)"
    _split_kernel[(B, Hkv, num_splits)](
        q, q_pos, quant.k_codes, quant.k_scale, quant.k_zero, quant.v_codes, quant.v_scale, quant.v_zero,
        qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths, acc, m, l,
        *quant.k_codes.stride()[:2], *quant.v_codes.stride()[:2], quant.k_scale.stride(0), quant.v_scale.stride(0),
        k_pool.stride(0), pos_pool.stride(0), 1.0 / math.sqrt(D), nq, nb, num_splits, q_split, f_split, group,
        D=D, K_BITS=quant.k_bits, V_BITS=quant.v_bits, G=G, R=R, KEYS_PER_CHANNEL=quant.keys_per_channel,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=tokens, BLOCK_G=block_g, BLOCK_D=block_d,
        UPCAST=exact_dots(q.dtype),
        NUM_STAGES=stages, num_warps=warps)
    _merge_kernel[(B, Hkv)](acc, m, l, out, lse, num_splits, group, D=D, BLOCK_G=block_g, BLOCK_D=block_d)
    return out
