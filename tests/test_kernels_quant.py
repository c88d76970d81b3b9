"""kernels.quant_decode against kernels.reference.quantized_decode_attention, and the full-precision
kernels over a QuantizedBlockPool's strided blocks, under the Triton interpreter.

Inputs live in a real QuantizedBlockPool, so every field the kernels read is a strided view into
one byte arena. Rows nobody uses hold random bytes (never read: tables point elsewhere or hold -1),
slots past a head's length hold large finite garbage at position 0 (visible, were the length mask
to fail), and a quantized block may be held only in part, its tail rows garbage codes and scales.
Shapes are tiny: the interpreter runs each program in numpy."""

import math

import pytest
import torch

from helpers import paged_layout
from nanokv.kernels.prefill import prefill_attention
from nanokv.kernels.paged_decode import paged_decode_attention
from nanokv.kernels.quant_decode import quantized_decode_attention
from nanokv.kernels import reference
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.cache.quant_pool import QuantizedBlockPool, QuantSpec
from nanokv.methods.kvtuner import KVTunerCodec
from nanokv.methods.leankv import HeteroCodec

GARBAGE = 1e4  # large but finite in float16


def fresh_pool(gen, num_blocks, spec, d, dtype):
    """A pool whose rows 1.. hold random bytes (row 0 stays zero: the pool never hands it out)."""
    pool = QuantizedBlockPool(num_blocks, spec, d, dtype)
    pool.arena[1:] = torch.randint(0, 256, pool.arena[1:].shape, generator=gen, dtype=torch.uint8)
    return pool


def write_quantized(pool, block, k, v, held, layer=0):
    """Quantize R tokens into `block` with the pool's codec (at `layer`); rows from `held` on become
    garbage where they are per token (per-channel key scales are shared with the held rows of their
    group, so they stay)."""
    spec = pool.spec
    fields = spec.encode(k, v, layer, None)
    for name, value in fields.items():
        pool.qfields[name][block] = value
    per_token = ["k_codes", "v_codes", "v_scale", "v_zero"] + ([] if spec.keys_per_channel else ["k_scale", "k_zero"])
    for name in per_token:
        pool.qfields[name][block, held:] = 255 if name.endswith("codes") else GARBAGE


def quant_inputs(seed, spec, d, dtype, group, qlens, lengths, hkv=2, layer=0):
    """qlens, lengths [B][Hkv]: tokens per head in quantized blocks, then in full-precision ones.
    Quantized tokens are positions 0 .. qlen - 1; full-precision ones a random sorted subset of
    later positions that always holds q_pos (so every head sees a token) and may hold one past it."""
    gen = torch.Generator().manual_seed(seed)
    R, bs, B = spec.block_size, spec.full_block_size(d, dtype), len(qlens)
    nq = max(math.ceil(n / R) for row in qlens for n in row)
    nb = max(math.ceil(n / bs) for row in lengths for n in row)
    num_blocks = 1 + B * hkv * (nq + nb) + 3  # block 0, then some blocks stay unused
    pool = fresh_pool(gen, num_blocks, spec, d, dtype)
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    # a spare -1 column in both tables: entries past a head's blocks are never read
    qtables = torch.full((B, hkv, nq + 1), -1, dtype=torch.int64)
    tables = torch.full((B, hkv, nb + 1), -1, dtype=torch.int64)
    q_pos = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        q_pos[b] = max(q + n for q, n in zip(qlens[b], lengths[b])) + int(torch.randint(0, 5, (1,), generator=gen))
        for h in range(hkv):
            qlen, n = qlens[b][h], lengths[b][h]
            for j in range(math.ceil(qlen / R)):
                qtables[b, h, j] = block = order.pop()
                write_quantized(pool, block, torch.randn(R, d, generator=gen), torch.randn(R, d, generator=gen),
                                held=min(R, qlen - j * R), layer=layer)
            later = torch.arange(qlen, int(q_pos[b]) + 2)
            later = later[later != q_pos[b]]
            pos = torch.cat([later[torch.randperm(len(later), generator=gen)[:n - 1]], q_pos[b:b + 1]]).sort().values
            pos = pos if n else pos[:0]
            k, v = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
            for j in range(math.ceil(n / bs)):
                tables[b, h, j] = block = order.pop()
                part = slice(j * bs, (j + 1) * bs)
                m = len(pos[part])
                pool.fields["k"][block], pool.fields["v"][block], pool.fields["pos"][block] = GARBAGE, -GARBAGE, 0
                pool.fields["k"][block, :m], pool.fields["v"][block, :m] = k[part], v[part]
                pool.fields["pos"][block, :m] = pos[part]
    q = torch.randn(B, hkv * group, d, generator=gen).to(dtype)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return q, q_pos, pool, qtables, as_t(qlens), tables, as_t(lengths)


def on_device(pool, device):
    """The same pool rows, on `device`."""
    moved = QuantizedBlockPool(pool.num_blocks, pool.spec, pool.head_dim, pool.dtype, device)
    moved.arena.copy_(pool.arena)
    return moved


def codec_decoded_attention(q, q_pos, pool, layer, qtables, qlens, tables, lengths):
    """Attention over what the pool's codec's own `decode` gives back of `layer`'s cold blocks (the
    cache's path for a codec the kernels do not read), float32."""
    k_q, v_q = QuantizedKVCache(layer + 1, qtables.shape[1], pool).decoded_cold(qtables, layer)
    return reference.dequantized_decode_attention(q.float(), q_pos, k_q, v_q, qlens, pool.fields["k"],
                                                  pool.fields["v"], pool.fields["pos"], tables, lengths)


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# On a GPU half-precision tiles meet on tensor cores: q, the dequantized K and V and the softmax
# weights each rounded to the cache's dtype (bfloat16: 8 significant bits) before a float32 sum.
TOL_TENSOR_CORES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Together: bits 2, 4, 8; keys per channel and per token; GQA 1 and 3; D 64 and 96; full-precision
# blocks of 2 to 16 tokens; float32, float16, bfloat16; heads with no quantized tokens, heads with
# no full-precision ones, quantized blocks held in part; one split and several (some empty).
CASES = [  # bits, per channel, G, R, group, D, dtype, splits, qlens [B][Hkv=2], lengths [B][Hkv=2]
    (2, True, 32, 64, 1, 64, torch.float32, None, [[128, 0], [64, 192]], [[5, 3], [0, 7]]),
    (4, False, 32, 32, 3, 96, torch.float16, 3, [[32, 96], [0, 64], [50, 7]], [[0, 9], [4, 1], [2, 13]]),
    (8, True, 16, 32, 3, 96, torch.float32, 4, [[64, 16], [32, 0]], [[17, 0], [3, 30]]),
    (2, False, 16, 32, 1, 64, torch.float16, 2, [[32, 0], [64, 23]], [[0, 6], [9, 3]]),
    (4, True, 16, 16, 3, 64, torch.bfloat16, None, [[48, 16], [0, 32]], [[2, 7], [5, 0]]),
    (8, False, 32, 64, 3, 64, torch.float32, 5, [[64, 128], [0, 64]], [[1, 0], [40, 2]]),
]
# The engine's shape of block (R = 128) under the half-precision tiling (kernels.quant_decode.tiling):
# tiles of 128 tokens at D=64 and 64 at D=128, each over several key groups, the last of a head's
# tokens a part tile, residual tiles over several full-precision blocks; float32's 16-token tiles.
TILED_CASES = [
    (4, True, 32, 128, 4, 64, torch.bfloat16, None, [[384, 200], [128, 0]], [[30, 97], [64, 1]]),
    (4, True, 32, 128, 4, 64, torch.float16, 3, [[256, 77], [0, 384]], [[100, 0], [5, 60]]),
    (2, True, 32, 128, 2, 128, torch.bfloat16, 2, [[256, 130], [384, 64]], [[1, 45], [80, 3]]),
    (8, False, 32, 128, 2, 128, torch.float16, None, [[192, 0], [128, 300]], [[64, 9], [0, 7]]),
    (4, True, 128, 128, 1, 128, torch.bfloat16, 4, [[512, 100], [128, 256]], [[3, 3], [70, 0]]),
    (4, True, 32, 128, 3, 64, torch.float32, 3, [[256, 90], [0, 128]], [[20, 1], [9, 33]]),
]


@pytest.mark.parametrize("bits, per_channel, G, R, group, d, dtype, splits, qlens, lengths", CASES + TILED_CASES)
def test_quantized_decode_matches_reference(bits, per_channel, G, R, group, d, dtype, splits, qlens, lengths,
                                            triton_device):
    spec = QuantSpec(bits, per_channel, G, R)
    q, q_pos, pool, qtables, qlens_t, tables, lengths_t = quant_inputs(
        bits * 100 + G + R + d + group, spec, d, dtype, group, qlens, lengths)
    q, q_pos, qtables, qlens_t, tables, lengths_t = (t.to(triton_device) for t in (q, q_pos, qtables, qlens_t,
                                                                                  tables, lengths_t))
    pool = on_device(pool, triton_device)
    assert pool.quant_blocks(0).k_codes.stride(0) == pool.unit_bytes, "fields are strided views of the rows"
    args = (pool.quant_blocks(0), qtables, qlens_t, pool.fields["k"], pool.fields["v"], pool.fields["pos"],
            tables, lengths_t)
    out = quantized_decode_attention(q, q_pos, *args, num_splits=splits)
    # the reference in float32 from the same (possibly half-precision) pool
    ref = reference.quantized_decode_attention(q.float(), q_pos, *args)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()  # outputs start as NaN: a row left unwritten would show
    assert rel_err(out, ref) < (TOL if triton_device.type == "cpu" else TOL_TENSOR_CORES)[dtype]


@pytest.mark.parametrize("codec, layer, d, dtype, splits", [
    (HeteroCodec(8, 4, 32, 64), 0, 64, torch.float32, 2),           # LeanKV: K8V4
    (HeteroCodec(4, 2, 16, 32), 0, 96, torch.float16, None),        # K4V2
    (KVTunerCodec([(8, 8), (4, 2)], 32, 32), 1, 64, torch.float32, 3),  # a narrow layer in rows sized for K8V8
    (KVTunerCodec([(8, 4), (2, 2)], 16, 32), 0, 64, torch.bfloat16, None)])
def test_keys_and_values_at_their_own_bits_read_as_the_codec_decodes_them(codec, layer, d, dtype, splits,
                                                                         triton_device):
    """The kernel over a codec that packs K and V at different widths (rows possibly wider than a
    layer's codes) equals attention over what that codec's own `decode` gives back."""
    q, q_pos, pool, qtables, qlens, tables, lengths = quant_inputs(
        d + layer, codec, d, dtype, 2, [[64, 32], [96, 0]], [[5, 2], [0, 9]], layer=layer)
    quant = pool.quant_blocks(layer)
    assert (quant.k_bits, quant.v_bits) == codec.packed_bits(layer)
    want = codec_decoded_attention(q, q_pos, pool, layer, qtables, qlens, tables, lengths)
    args = (qtables, qlens, pool.fields["k"], pool.fields["v"], pool.fields["pos"], tables, lengths)
    assert rel_err(reference.quantized_decode_attention(q.float(), q_pos, quant, *args), want) < 1e-5
    moved = on_device(pool, triton_device)
    q, q_pos, qtables, qlens, tables, lengths = (t.to(triton_device) for t in (q, q_pos, qtables, qlens, tables,
                                                                              lengths))
    out = quantized_decode_attention(q, q_pos, moved.quant_blocks(layer), qtables, qlens, moved.fields["k"],
                                     moved.fields["v"], moved.fields["pos"], tables, lengths, num_splits=splits)
    assert rel_err(out, want) < (TOL if triton_device.type == "cpu" else TOL_TENSOR_CORES)[dtype]


def test_quantized_tokens_count_and_masked_slots_do_not_leak():
    """Quantized tokens weigh in (dropping them changes the output), and rewriting everything the
    masks hide (rows past qlens, slots past lengths, unused rows) changes nothing."""
    spec = QuantSpec(4, True, 16, 32)
    q, q_pos, pool, qtables, qlens, tables, lengths = quant_inputs(3, spec, 64, torch.float32, 2,
                                                                   [[32, 40], [64, 16]], [[3, 5], [6, 1]])
    run = lambda ql: quantized_decode_attention(q, q_pos, pool.quant_blocks(0), qtables, ql, pool.fields["k"],  # noqa: E731
                                                pool.fields["v"], pool.fields["pos"], tables, lengths, num_splits=2)
    out = run(qlens)
    assert rel_err(run(torch.zeros_like(qlens)), out) > 1e-2
    used = set(qtables[qtables >= 0].tolist()) | set(tables[tables >= 0].tolist())
    unused = [i for i in range(1, pool.num_blocks) if i not in used]
    pool.arena[unused] = 77
    pool.qfields["v_scale"][qtables[0, 1, 1], 8:] = -GARBAGE  # head (0, 1) holds 8 tokens of its 2nd block
    for b in range(2):
        for h in range(2):
            n, bs = int(lengths[b, h]), pool.block_size
            last = tables[b, h, (n - 1) // bs]
            pool.fields["k"][last, (n - 1) % bs + 1:] = -3e3
    torch.testing.assert_close(run(qlens), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, group, d", [(torch.float32, 2, 96), (torch.float16, 1, 64)])
def test_full_precision_kernels_read_strided_blocks(dtype, group, d):
    """prefill_attention and paged_decode_attention over a QuantizedBlockPool's full-precision
    fields (blocks one arena row apart, random bytes between them) match the reference."""
    gen = torch.Generator().manual_seed(d)
    spec = QuantSpec(2, True, 32, 32)
    bs = spec.full_block_size(d, dtype)
    heads, q_pos = [], []
    for first, prefix, new in [(0, 5, 9), (2, 0, 3)]:
        pos = torch.arange(first, first + prefix + new, dtype=torch.int32)
        heads.append([(torch.randn(len(pos), d, generator=gen), torch.randn(len(pos), d, generator=gen), pos)
                      for _ in range(2)])
        q_pos.append(pos[prefix:].long())
    num_blocks = sum(math.ceil(len(p) / bs) for row in heads for _, _, p in row) + 3
    k_flat, v_flat, pos_flat, tables, lengths = paged_layout(gen, heads, num_blocks, bs, d, True, dtype, 1)
    pool = fresh_pool(gen, num_blocks + 1, spec, d, dtype)  # the same blocks, one row later (row 0 unused)
    pool.fields["k"][1:], pool.fields["v"][1:], pool.fields["pos"][1:] = k_flat, v_flat, pos_flat
    tables = torch.where(tables >= 0, tables + 1, tables)
    fields = pool.fields["k"], pool.fields["v"], pool.fields["pos"]
    assert not fields[0].is_contiguous()

    q_pos = torch.cat(q_pos)
    q = torch.randn(len(q_pos), 2 * group, d, generator=gen).to(dtype)
    cu = torch.tensor([0, 9, 12], dtype=torch.int32)
    out = prefill_attention(q, q_pos, cu, *fields, tables, lengths, block_m=16)
    for b in range(2):
        s, e = int(cu[b]), int(cu[b + 1])
        ref = reference.paged_attention(q[s:e].float()[None], q_pos[s:e][None], fields[0].float(), fields[1].float(),
                                        fields[2], tables[b:b + 1], lengths[b:b + 1])[0]
        assert rel_err(out[s:e], ref) < TOL[dtype]

    pick = torch.tensor([3, 10])  # a decode step per sequence, from a query that later keys are hidden from
    assert (q_pos[pick] < q_pos[cu[1:] - 1]).all()  # each sequence holds keys past its query
    out = paged_decode_attention(q[pick], q_pos[pick], *fields, tables, lengths, blocks_per_split=2)
    ref = reference.paged_attention(q[pick].float()[:, None], q_pos[pick][:, None], fields[0].float(),
                                    fields[1].float(), fields[2], tables, lengths)[:, 0]
    assert rel_err(out, ref) < TOL[dtype]
