"""Decode attention over a latent KV cache (LoRC, Palu) in Triton: the twin of
`reference.latent_attention` for one query token per sequence.

The cache (nanokv/cache/latent_cache.py) keeps each token as its latent, cat(K latent (r_k),
V latent (r_v)), in `m` consecutive slots of its head group's blocks: chunk c of C channels in slot
token * m + c // 2, in the k field when c is even, the v field when odd. The twin gathers every
latent, rebuilds [B, H, S, D] float32 keys, rotates them, and only then attends: it writes and
reads back the whole key cache a step. This kernel rebuilds each key tile in registers and never
stores it:

- A program per (sequence, model kv-head, split), grid (B, H, num_splits). A kv-head's tokens are
  its group's, so the heads of one group read the same latents (from L2 after the first).
- Each iteration takes BLOCK_N tokens. Every element of a latent tile finds its own address: its
  slot (token * m + column // 2C), the slot's block through the group's table, its field by chunk
  parity. Columns past r_k + r_v (chunk padding) are never read.
- Keys are rebuilt on tensor cores as two half tiles, k1 = latent_k @ Bk1 + b1 and
  k2 = latent_k @ Bk2 + b2, where Bk1, Bk2 [r_k, D/2] are the head's rows of the key basis,
  transposed (the wrapper lays them out once a call, zero-padded, in the tiles' dtype). The K
  latent is loaded KEY_COLUMNS columns at a time, each tile its own dot, rather than as one
  [BLOCK_N, r_k + r_v] tile times a basis zero on its value rows: Palu's groups of 4 heads of 128
  at rank 256 would make that basis 128 KiB a program, and half its products zeros. Halves make
  RoPE's rotate-half elementwise in registers: k_rot1 = k1 cos1 - k2 sin1, k_rot2 = k2 cos2 +
  k1 sin2, cos and sin loaded at each token's position (its first slot's). The rotated keys are
  rounded to q's dtype, as the twin rounds them.
- The kv-head's whole query group scores against them (q in halves: two dots), online softmax as
  in paged_decode, and acc [BLOCK_G, r_v] += p @ latent_v, the V latent loaded as its own tile:
  the values are never rebuilt, the cache takes the output through the value basis.
- Split-K and the merge are paged_decode's: each split writes (acc, m, l) to float32 scratch and
  its `_merge_kernel` combines them by log-sum-exp into out [B, Hq, r_v].

Tiles stay in the cache's dtype with float32 accumulation (tensor cores); a float32 cache, a q of
another dtype and the interpreter take float32 tiles and exact dots (launch.exact_dots). On the
tensor-core path the key basis is rounded to the cache's dtype too, which the twin (float32 basis)
does not do (float16 under the interpreter: 4e-4 relative error against the float32 twin, the
same as the twin's own in float16).
"""

import math

import torch
import triton
import triton.language as tl

from nanokv.kernels.launch import exact_dots, split_count
from nanokv.kernels.paged_decode import MIN_SPLIT_TOKENS, NUM_STAGES, _dot, _merge_kernel, _online_softmax

# Tokens a program reads per iteration, and its warps; key-latent columns a key-rebuild dot takes.
# Compiled for sm_90 with Triton's ptxas (as scripts/compile_kernels.py does), bf16, 32 tokens over
# 8 warps: ~105 registers a thread at head_dim 128, ranks (64, 64); 128 registers and 139 KiB of
# shared memory at Palu's groups (4 heads of 128, ranks (256, 256)); nothing spilled. 4 warps spill
# with float32 tiles, and 64 tokens at Palu's shape need more shared memory than an H100 has.
# Float32 tiles with exact dots take 16 tokens.
TILE_TOKENS, EXACT_TILE_TOKENS, NUM_WARPS = 32, 16, 8
KEY_COLUMNS = 64


@triton.jit
def _latent_columns(k_ptr, v_ptr, table_row, first, held, col, col_ok, s_kv,
                    C: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Columns `col` of the latents of the tokens whose first slots are `first` -> [BLOCK_N, cols]:
    column j is chunk j // C, in slot first + j // 2C, in the k field for even chunks, v for odd."""
    slot = first[:, None] + (col // (2 * C))[None, :]
    ok = held[:, None] & col_ok[None, :]
    block = tl.load(table_row + slot // BLOCK_SIZE, mask=ok, other=0)
    # int64 addresses: block ids come from the table
    at = block * s_kv + (slot % BLOCK_SIZE) * C + (col % C)[None, :]
    in_k_field = ((col // C) % 2 == 0)[None, :]
    return tl.load(tl.where(in_k_field, k_ptr + at, v_ptr + at), mask=ok, other=0.0)


@triton.jit
def _latent_split_kernel(q_ptr, q_pos_ptr, k_ptr, v_ptr, pos_ptr, tables_ptr, lengths_ptr, basis_ptr, bias_ptr,
                         cos_ptr, sin_ptr, acc_ptr, m_ptr, l_ptr, s_kv, s_pos, sm_scale, window, nb, num_splits,
                         split_tokens, group, heads_per_group,
                         D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, C: tl.constexpr,
                         M: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, KEY_TILE: tl.constexpr,
                         KEY_TILES: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_kv = tl.num_programs(1)
    head = b * num_kv + h
    row = b * (num_kv // heads_per_group) + h // heads_per_group  # (sequence, head group): tables, lengths
    table_row = tables_ptr + row * nb
    g = tl.arange(0, BLOCK_G)
    e = tl.arange(0, BLOCK_HALF)
    kc = tl.arange(0, KEY_TILE)
    vc = tl.arange(0, BLOCK_V)
    n = tl.arange(0, BLOCK_N)
    g_ok, e_ok, vc_ok = g < group, e < HALF, vc < RV
    key_dtype = q_ptr.dtype.element_ty

    q_rows = q_ptr + (head * group + g)[:, None] * D + e[None, :]
    q_mask = g_ok[:, None] & e_ok[None, :]
    q1 = tl.load(q_rows, mask=q_mask, other=0.0)
    q2 = tl.load(q_rows + HALF, mask=q_mask, other=0.0)
    if UPCAST:
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    bias1 = tl.load(bias_ptr + h * D + e, mask=e_ok, other=0.0)
    bias2 = tl.load(bias_ptr + h * D + HALF + e, mask=e_ok, other=0.0)
    basis = basis_ptr + h * (KEY_TILES * KEY_TILE) * D + kc[:, None] * D + e[None, :]
    q_pos = tl.load(q_pos_ptr + b).to(tl.int64)
    tokens = tl.load(lengths_ptr + row).to(tl.int32) // M
    lo = s * split_tokens
    hi = tl.minimum(lo + split_tokens, tokens)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_V], tl.float32)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        token = start + n
        held = token < hi  # tokens past the length may sit on -1 table entries: never load them
        first = token * M
        first_block = tl.load(table_row + first // BLOCK_SIZE, mask=held, other=0)
        pos = tl.load(pos_ptr + first_block * s_pos + first % BLOCK_SIZE, mask=held, other=0)
        visible = held & (pos <= q_pos)
        if HAS_WINDOW:
            visible = visible & (q_pos - pos < window)
        # keys before RoPE, a tile of key-latent columns at a time: a group's basis may be wider
        # than registers hold (Palu: 4 heads of 128 at rank 256), and no zero rows are multiplied
        k1 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
        k2 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
        for t in tl.static_range(KEY_TILES):
            col = t * KEY_TILE + kc
            latent_k = _latent_columns(k_ptr, v_ptr, table_row, first, held, col, col < RK, s_kv, C, BLOCK_SIZE)
            basis1 = tl.load(basis + t * KEY_TILE * D, mask=e_ok[None, :], other=0.0)
            basis2 = tl.load(basis + t * KEY_TILE * D + HALF, mask=e_ok[None, :], other=0.0)
            if UPCAST:
                latent_k = latent_k.to(tl.float32)
            k1 += _dot(latent_k, basis1, UPCAST)                 # tensor cores, float32 accumulator
            k2 += _dot(latent_k, basis2, UPCAST)
        latent_v = _latent_columns(k_ptr, v_ptr, table_row, first, held, RK + vc, vc_ok, s_kv, C, BLOCK_SIZE)
        k1 += bias1[None, :]
        k2 += bias2[None, :]
        trig = pos[:, None] * D + e[None, :]
        trig_ok = held[:, None] & e_ok[None, :]
        cos1 = tl.load(cos_ptr + trig, mask=trig_ok, other=0.0)
        sin1 = tl.load(sin_ptr + trig, mask=trig_ok, other=0.0)
        cos2 = tl.load(cos_ptr + trig + HALF, mask=trig_ok, other=0.0)
        sin2 = tl.load(sin_ptr + trig + HALF, mask=trig_ok, other=0.0)
        key1 = (k1 * cos1 - k2 * sin1).to(key_dtype)
        key2 = (k2 * cos2 + k1 * sin2).to(key_dtype)
        if UPCAST:
            key1, key2, latent_v = key1.to(tl.float32), key2.to(tl.float32), latent_v.to(tl.float32)
        scores = _dot(q1, tl.trans(key1), UPCAST) + _dot(q2, tl.trans(key2), UPCAST)
        scores = tl.where(visible[None, :], scores * sm_scale, float("-inf"))   # [BLOCK_G, BLOCK_N]
        m, l, acc = _online_softmax(m, l, acc, scores, latent_v, UPCAST)

    part = (head * num_splits + s) * group + g  # scratch row of (b, h, split, g)
    tl.store(m_ptr + part, m, mask=g_ok)
    tl.store(l_ptr + part, l, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * RV + vc[None, :], acc, mask=g_ok[:, None] & vc_ok[None, :])


def latent_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, slots_per_token, k_basis, k_bias,
                            ranks, cos, sin, sliding_window=None, blocks_per_split=None):
    """q [B, Hq, D] (one query token per sequence), q_pos [B]; k_pool, v_pool [N, block_size, C] the
    latents' chunks, pos_pool [N, block_size] int32; tables [B, G, nb] (-1 past a group's blocks) and
    lengths [B, G] in slots, `slots_per_token` a token; k_basis [G, group * D, r_k], k_bias
    [G, group * D]; ranks (r_k, r_v); cos, sin [P, D] float32 by position. -> [B, Hq, r_v] in q's
    dtype: reference.latent_attention(q[:, None], q_pos[:, None], ...)[:, 0].

    blocks_per_split: blocks of a group's table per program (default: from launch.split_count).
    Output and scratch start as NaN, so a row the kernels fail to write shows in the tests."""
    B, Hq, D = q.shape
    G, nb = tables.shape[1], tables.shape[2]
    block_size, C = k_pool.shape[1], k_pool.shape[2]
    r_k, r_v = ranks
    heads_per_group = k_basis.shape[1] // D
    H = G * heads_per_group
    group = Hq // H
    assert Hq == H * group and D % 2 == 0 and k_basis.shape[-1] == r_k
    assert r_k + r_v <= 2 * slots_per_token * C, "a token's slots hold its latents"
    # blocks may be strided views, but a block's [block_size, C] chunks are contiguous, K's and V's
    # blocks one stride apart
    assert k_pool.shape == v_pool.shape and k_pool.stride(0) == v_pool.stride(0)
    assert k_pool.stride(1) == v_pool.stride(1) == C and k_pool.stride(2) == v_pool.stride(2) == 1
    assert pos_pool.stride(-1) == 1

    upcast = exact_dots(k_pool.dtype) or q.dtype != k_pool.dtype
    key_tile = max(16, min(KEY_COLUMNS, triton.next_power_of_2(r_k)))  # tl.dot's minimum tile side on a GPU
    key_tiles = -(-r_k // key_tile)
    # each kv-head's basis rows [D, r_k] as the right side of latent_k @ basis, zero past r_k
    basis = torch.zeros(H, key_tiles * key_tile, D, dtype=torch.float32 if upcast else k_pool.dtype,
                        device=q.device)
    basis[:, :r_k] = k_basis.reshape(H, D, r_k).transpose(1, 2)
    bias = k_bias.reshape(H, D).to(torch.float32).contiguous()

    tokens = max(1, nb * block_size // slots_per_token)
    if blocks_per_split:
        split_tokens = max(1, blocks_per_split * block_size // slots_per_token)
    else:
        split_tokens = math.ceil(tokens / split_count(B * H, tokens, q.device, MIN_SPLIT_TOKENS))
    num_splits = math.ceil(tokens / split_tokens)

    nan, f32 = float("nan"), torch.float32
    acc = torch.full((B, H, num_splits, group, r_v), nan, dtype=f32, device=q.device)
    m = torch.full((B, H, num_splits, group), nan, dtype=f32, device=q.device)
    l = torch.full_like(m, nan)
    out = torch.full((B, Hq, r_v), nan, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq), nan, dtype=f32, device=q.device)

    block_g, block_v = (max(16, triton.next_power_of_2(x)) for x in (group, r_v))  # tl.dot's minimum side
    tile = EXACT_TILE_TOKENS if upcast else TILE_TOKENS
    block_n = max(16, min(tile, triton.next_power_of_2(split_tokens)))  # a short split: no padded iterations
    q, q_pos, tables, lengths = (t.contiguous() for t in (q, q_pos, tables, lengths))
    cos, sin = cos.to(f32).contiguous(), sin.to(f32).contiguous()
    _latent_split_kernel[(B, H, num_splits)](
        q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, basis, bias, cos, sin, acc, m, l,
        k_pool.stride(0), pos_pool.stride(0), 1.0 / math.sqrt(D), sliding_window or 0, nb, num_splits,
        split_tokens, group, heads_per_group,
        D=D, HALF=D // 2, BLOCK_HALF=max(16, triton.next_power_of_2(D // 2)), C=C, M=slots_per_token, RK=r_k,
        RV=r_v, KEY_TILE=key_tile, KEY_TILES=key_tiles, BLOCK_V=block_v, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        BLOCK_G=block_g, HAS_WINDOW=sliding_window is not None, UPCAST=upcast, NUM_STAGES=NUM_STAGES,
        num_warps=NUM_WARPS)
    _merge_kernel[(B, H)](acc, m, l, out, lse, num_splits, group, D=r_v, BLOCK_G=block_g, BLOCK_D=block_v)
    return out
