"""Paged decode attention in Triton: the twin of `reference.paged_attention` for one query token
per sequence (same masking by stored positions, sliding window, GQA, per-head lengths, probs).

Decode is bound by reading K and V: every held slot is read once per step, and the kernel is
fast when those reads keep the memory system busy. Hence:

- One program covers a kv-head's whole query group: each K/V tile is read once for all `group`
  query heads, which ride on the rows of one [BLOCK_G, D] x [D, BLOCK_N] tensor-core dot.
- Each iteration reads BLOCK_N slots (64: four 16-token blocks), each slot finding its block
  through the table, K and V both loaded before either is used, so 32 KiB per program are in
  flight; the loop is also marked for software pipelining (`num_stages`).
- Tiles stay in the cache's dtype (bf16/fp16) and the dots accumulate in float32 on tensor cores;
  only a float32 cache and the interpreter take float32 tiles and exact dots (launch.exact_dots).
- Split-K ("flash decoding"): one query per sequence gives only B * Hkv programs, a few for B=1
  on a GPU of 132 SMs. Each head's table is cut into splits sized from the batch and the SM count
  (launch.split_count), so B=1 spreads a 4k context over 16 programs per head, while B=32 runs
  as one or two splits and does not pay for merging many partials:

1. `_split_kernel`, grid (B, Hkv, num_splits): one program runs an online softmax (running max m,
   running sum l, unnormalized output acc) for all `group` query heads of its kv-head over its
   split, and writes the partial (acc, m, l) to float32 scratch. The H2O-style methods' variant
   (WRITE_LOGITS, its own specialization, so the common path carries none of it) also writes
   every slot's scaled logit (-inf where masked). A method's per-slot logit bias (HAS_BIAS: KeepKV's
   log vote counts) is added to the scaled logits, so those and the probabilities are the biased ones.
2. `_merge_kernel`, grid (B, Hkv): combines the splits by the log-sum-exp rule,
   out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s with M = max_s m_s, and writes out and
   lse = M + log(L). probs = exp(logit - lse) is then one torch expression.

`decode_parts` runs the same two kernels over several runs of blocks in one softmax: each run's
splits write into one scratch, and one merge combines them all. The block kinds whose heads hold
two kinds of block use it (two_part_decode.py): a run may have keys narrower than its values
(KD < D, ThinK's slim keys) and rows restored to stored magnitudes as they load (the RESTORE
specialization, MiniCache's merged layer).

A split with no visible slot (past the head's length, or outside the window) keeps m = -inf,
l = 0, acc = 0: every exp() below is taken against a max that is replaced by 0 while still -inf,
so such a split weighs exp(-inf) = 0 instead of producing NaN.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanokv.kernels.launch import exact_dots, split_count

MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, scratch write) is not worth it
# Slots a program reads per iteration, and its warps. Checked with scripts/compile_kernels.py for
# sm_90 at head_dim 128: 64 slots over 8 warps take ~210 registers a thread and spill nothing (4
# warps spill: each thread then holds twice the 64-bit addresses of a [64, 128] tile); float32
# tiles with exact dots spill at 64, so they take 32.
TILE_TOKENS, EXACT_TILE_TOKENS, NUM_WARPS = 64, 32, 8
NUM_STAGES = 2


def default_blocks_per_split(nb: int, block_size: int, programs: int = 1, device="cpu") -> int:
    """Blocks of a head's table per split: see launch.split_count."""
    return math.ceil(nb / split_count(programs, nb * block_size, device, MIN_SPLIT_TOKENS))


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32: exact float32 products when upcast, else on tensor cores."""
    if UPCAST:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _online_softmax(m, l, acc, scores, v, UPCAST: tl.constexpr):
    """Fold a tile of scores [BLOCK_G, N] (-inf where masked) and its values [N, BLOCK_D] into the
    running max m, sum l and unnormalized output acc (every decode kernel here does this)."""
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid -inf - -inf
    p = tl.exp(scores - m_ref[:, None])
    alpha = tl.exp(m - m_ref)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_new, l * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _split_kernel(q_ptr, q_pos_ptr, k_ptr, v_ptr, pos_ptr, tables_ptr, lengths_ptr, k_mag_ptr, v_mag_ptr,
                  bias_ptr, acc_ptr, m_ptr, l_ptr, logits_ptr, s_kv, s_pos, s_mag, s_bias,
                  sm_scale, window, nb, first_split, num_splits, split_slots, group,
                  D: tl.constexpr, KD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KD: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  WRITE_LOGITS: tl.constexpr, RESTORE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                  NUM_STAGES: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_kv = tl.num_programs(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dk = tl.arange(0, BLOCK_KD)
    n = tl.arange(0, BLOCK_N)
    g_ok, d_ok, dk_ok = g < group, d < D, dk < KD
    head = b * num_kv + h
    # the group's query heads are rows head*group .. head*group+group-1 of q viewed as [B*Hq, KD]
    q = tl.load(q_ptr + (head * group + g)[:, None] * KD + dk[None, :], mask=g_ok[:, None] & dk_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(q_pos_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + head).to(tl.int32)
    lo = s * split_slots
    hi = tl.minimum(lo + split_slots, nb * BLOCK_SIZE)
    if not WRITE_LOGITS:
        hi = tl.minimum(hi, length)  # nothing past the length to score: skip its blocks entirely

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # BLOCK_N slots a step: several blocks or parts of them (blocks need not be a power of two),
    # so each slot looks up its own block id; neighbours share the table entry, read from L1.
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        slot = start + n
        in_split = slot < hi
        held = in_split & (slot < length)  # slots past the length may sit on -1 table entries: never load them
        block = tl.load(tables_ptr + head * nb + slot // BLOCK_SIZE, mask=held, other=0)
        # the pools may be strided views (a quantized pool's rows): address block, then offset in it
        offset = slot % BLOCK_SIZE
        pos = tl.load(pos_ptr + block * s_pos + offset, mask=held, other=0)
        visible = held & (pos <= q_pos)
        if HAS_WINDOW:
            visible = visible & (q_pos - pos < window)
        # int64 addresses: block ids come from the table
        k = tl.load(k_ptr + (block * s_kv + offset * KD)[:, None] + dk[None, :], mask=held[:, None] & dk_ok[None, :],
                    other=0.0)
        v = tl.load(v_ptr + (block * s_kv + offset * D)[:, None] + d[None, :], mask=held[:, None] & d_ok[None, :],
                    other=0.0)
        if RESTORE:
            # MiniCache's merged slots: each stored vector is a direction, restored to the layer's own
            # magnitude as it loads (rounded to the cache dtype, as the twin stores it); magnitude 0
            # marks a slot the layer does not read
            k_mag = tl.load(k_mag_ptr + block * s_mag + offset, mask=held, other=0.0)
            v_mag = tl.load(v_mag_ptr + block * s_mag + offset, mask=held, other=0.0)
            visible = visible & (k_mag > 0)
            k = _restored(k, k_mag)
            v = _restored(v, v_mag)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        scores = _dot(q, tl.trans(k), UPCAST) * sm_scale         # tensor cores, float32 accumulator
        if HAS_BIAS:  # a slot field added to each slot's logit (KeepKV's log vote counts)
            scores += tl.load(bias_ptr + block * s_bias + offset, mask=held, other=0.0)[None, :]
        scores = tl.where(visible[None, :], scores, float("-inf"))   # [BLOCK_G, BLOCK_N]
        if WRITE_LOGITS:
            tl.store(logits_ptr + (head * group + g)[:, None] * (nb * BLOCK_SIZE) + slot[None, :], scores,
                     mask=g_ok[:, None] & in_split[None, :])
        m, l, acc = _online_softmax(m, l, acc, scores, v, UPCAST)

    part = (head * num_splits + first_split + s) * group + g  # scratch row of (b, h, split, g)
    tl.store(m_ptr + part, m, mask=g_ok)
    tl.store(l_ptr + part, l, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _restored(x, magnitude):
    """Rows of x with their length set to `magnitude` (the twin: reference.restored)."""
    xf = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(xf * xf, axis=1))
    return (xf * (magnitude / tl.maximum(norm, 1e-30))[:, None]).to(x.dtype)


@triton.jit
def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, num_splits, group,
                  D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    head = b * tl.num_programs(1) + h
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok, d_ok = g < group, d < D
    mask = g_ok[:, None] & d_ok[None, :]
    big_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    big_l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # the same online rule as within a split, one split at a time, so any number of splits fits
    for s in range(num_splits):
        part = (head * num_splits + s) * group + g
        m_s = tl.load(m_ptr + part, mask=g_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + part, mask=g_ok, other=0.0)
        acc_s = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(big_m, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp(big_m - m_ref), tl.exp(m_s - m_ref)
        big_l = big_l * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        big_m = m_new
    big_l = tl.where(g_ok, big_l, 1.0)  # padding rows hold 0: spare them (and the interpreter) a 0 / 0
    rows = head * group + g  # (b, query head h*group + g) as a row of [B*Hq, ...]
    tl.store(out_ptr + rows[:, None] * D + d[None, :], (acc / big_l[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(lse_ptr + rows, big_m + tl.log(big_l), mask=g_ok)


@dataclass
class DecodePart:
    """One run of blocks a decode reads, its own kind of slot: q [B, Hq, KD] the query as these keys
    see it; k [N, block_size, KD], v [N, block_size, D], pos [N, block_size] int32 pools (views of
    rows allowed; K and V share their block stride); tables [B, Hkv, nb] (-1 past a head's
    blocks), lengths [B, Hkv]. With `magnitudes` (k_mag, v_mag [N, block_size] float32), each
    slot's K and V are directions restored to those lengths, and a slot of K magnitude 0 is not read.
    With `bias` [N, block_size] float32, each slot's value is added to its scaled logit."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor
    magnitudes: tuple[torch.Tensor, torch.Tensor] | None = None
    bias: torch.Tensor | None = None


def paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None,
                           return_probs=False, blocks_per_split=None, bias=None):
    """q [B, Hq, D] (one query token per sequence); q_pos [B] int; k_pool, v_pool [num_blocks, block_size, D];
    pos_pool [num_blocks, block_size] int32; tables [B, Hkv, nb] int64 block ids, -1 past a head's blocks;
    lengths [B, Hkv] tokens held per head (heads may differ). -> out [B, Hq, D] in q's dtype, and with
    return_probs also probs [B, Hkv, group, nb * block_size] float32: the softmax weight of every slot of
    each head's table, 0 where masked or past the length (of the biased softmax, with a bias).

    blocks_per_split: blocks of a head's table per program (default: default_blocks_per_split).
    bias: [num_blocks, block_size] float32 added to each slot's scaled logit (a HAS_BIAS
    specialization: without it the kernel reads nothing more)."""
    assert k_pool.shape == v_pool.shape, "K and V of one width"
    part = DecodePart(q, k_pool, v_pool, pos_pool, tables, lengths, bias=bias)
    return decode_parts([part], q_pos, 1.0 / math.sqrt(q.shape[-1]), sliding_window, return_probs, blocks_per_split)


def decode_parts(parts: list[DecodePart], q_pos, sm_scale: float, sliding_window=None, return_probs=False,
                 blocks_per_split=None):
    """One softmax over several parts (ThinK's slim blocks then full ones; MiniCache's merged layer
    then its own): each part's splits write their partials into one scratch, and the merge kernel
    combines them all as it combines any splits. -> out [B, Hq, D] in the first part's q dtype
    (and probs, for a single part: see paged_decode_attention).

    Output and scratch start as NaN, not as whatever memory held: a slot the kernels fail to
    write then shows up in the tests instead of passing by luck."""
    first = parts[0]
    B, Hq, _ = first.q.shape
    D = first.v.shape[-1]
    Hkv = first.tables.shape[1]
    group = Hq // Hkv
    assert Hq == Hkv * group and (not return_probs or len(parts) == 1)
    parts = [part for part in parts if part.tables.shape[2]]  # a part with no blocks (none slim yet): no launch
    splits = []
    for part in parts:
        nb, block_size = part.tables.shape[2], part.k.shape[1]
        # Blocks may be strided (a quantized or pruned pool's blocks are views of its rows), but
        # within a block the [block_size, width] slots must be contiguous; K and V share one row stride.
        assert part.k.stride(-1) == 1 and part.k.stride(1) == part.k.shape[-1] and part.v.stride(1) == D, \
            "inner dims contiguous"
        assert part.v.stride(0) == part.k.stride(0) and part.pos.stride(-1) == 1, "K and V share their block stride"
        per_split = blocks_per_split or default_blocks_per_split(nb, block_size, B * Hkv, first.q.device)
        splits.append((per_split, math.ceil(nb / per_split)))
    num_splits = sum(n for _, n in splits)

    nan, f32, device = float("nan"), torch.float32, first.q.device
    acc = torch.full((B, Hkv, num_splits, group, D), nan, dtype=f32, device=device)
    m = torch.full((B, Hkv, num_splits, group), nan, dtype=f32, device=device)
    l = torch.full_like(m, nan)
    width = first.tables.shape[2] * first.k.shape[1]
    logits = torch.full((B, Hkv, group, width) if return_probs else (1,), nan, dtype=f32, device=device)
    out = torch.full((B, Hq, D), nan, dtype=first.q.dtype, device=device)
    lse = torch.full((B, Hq), nan, dtype=f32, device=device)

    block_g = max(16, triton.next_power_of_2(group))  # tl.dot's minimum tile side on a GPU
    block_d = max(16, triton.next_power_of_2(D))
    q_pos = q_pos.contiguous()
    first_split = 0
    for part, (per_split, n) in zip(parts, splits):
        q, tables, lengths = (t.contiguous() for t in (part.q, part.tables, part.lengths))
        KD, block_size = part.k.shape[-1], part.k.shape[1]
        k_mag, v_mag = part.magnitudes or (part.pos, part.pos)  # never read without RESTORE
        bias = part.pos if part.bias is None else part.bias     # never read without HAS_BIAS
        assert part.bias is None or (bias.dtype == torch.float32 and bias.stride(-1) == 1), "float32 bias rows"
        upcast = exact_dots(part.k.dtype) or q.dtype != part.k.dtype
        # a split of few slots (a short context, a test) takes a smaller tile: no padded iterations
        tile = EXACT_TILE_TOKENS if upcast else TILE_TOKENS
        if upcast and part.magnitudes is not None:
            tile //= 2  # float32 tiles restored in registers spill at 32 slots (sm_90, head_dim 128)
        block_n = max(16, min(tile, triton.next_power_of_2(per_split * block_size)))
        _split_kernel[(B, Hkv, n)](
            q, q_pos, part.k, part.v, part.pos, tables, lengths, k_mag, v_mag, bias, acc, m, l, logits,
            part.k.stride(0), part.pos.stride(0), k_mag.stride(0), bias.stride(0), sm_scale, sliding_window or 0,
            tables.shape[2], first_split, num_splits, per_split * block_size, group,
            D=D, KD=KD, BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=block_d,
            BLOCK_KD=max(16, triton.next_power_of_2(KD)), HAS_WINDOW=sliding_window is not None,
            WRITE_LOGITS=return_probs, RESTORE=part.magnitudes is not None, HAS_BIAS=part.bias is not None,
            UPCAST=upcast,
            NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
        first_split += n
    _merge_kernel[(B, Hkv)](acc, m, l, out, lse, num_splits, group, D=D, BLOCK_G=block_g, BLOCK_D=block_d)
    if not return_probs:
        return out
    probs = torch.exp(logits - lse.view(B, Hkv, group, 1))  # exp(-inf - lse) = 0 where masked
    return out, probs
