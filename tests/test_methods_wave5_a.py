"""GEAR and DecoQuant (issue 28, wave 5 group a): codecs of the tiered cache's cold blocks. Each on
hand-built blocks whose stored fields and read-back values are worked out by hand, against a
plain restatement of its algorithm (the codec's decode, and the engine's greedy tokens on real
weights), its bytes as stored, after snapkv, and its options."""

import pytest
import torch

from helpers import restated_greedy
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.methods.decoquant import DecoQuantCodec
from nanokv.methods.gear import GEARCodec, power_iteration
from test_quant_cache import fake_quant, tiny_config


def cache_with(codec, layers=2, heads=2, blocks=200, dtype=torch.float32):
    cfg = tiny_config(layers, heads)
    return QuantizedKVCache.from_memory(cfg, blocks * codec.unit_bytes(64), codec, dtype), cfg


# --- GEAR -------------------------------------------------------------------------------------

def restated_gear(x: torch.Tensor, is_key: bool, bits=2, group=64, rank=2, share=0.02, iterations=3):
    """One block x [R, D] of K (is_key) or V, as GEAR stores it and reads it back, in plain torch:
    per row (a key channel over the tokens, a value token over the channels) the largest and
    smallest max(1, round(share / 2 * row length)) entries are kept in float16 and set to the row's
    mean; the rest is quantized (keys per channel, values per token, groups of `group`); the error
    against that (outliers put back) is approximated by `iterations` rounds of power iteration from
    torch.rand(D, rank) of a generator seeded 0, QR in the last round, factors in float16."""
    x = x.float()
    rows = x.t() if is_key else x
    n = max(1, round(share / 2 * rows.shape[1])) if share else 0
    backbone = fake_quant(x, bits, group, dim=0 if is_key else 1)
    if n:
        idx = torch.cat([rows.topk(n).indices, rows.topk(n, largest=False).indices], 1)
        cleaned = rows.scatter(1, idx, rows.mean(1, keepdim=True).expand(-1, 2 * n))
        backbone = fake_quant(cleaned.t() if is_key else cleaned, bits, group, dim=0 if is_key else 1)
        back_rows = (backbone.t() if is_key else backbone).scatter(1, idx, rows.gather(1, idx).half().float())
        backbone = back_rows.t() if is_key else back_rows
    if not rank:
        return backbone
    error = x - backbone
    p = torch.rand(x.shape[1], rank, generator=torch.Generator().manual_seed(0))
    for step in range(iterations):
        if step == iterations - 1:
            p = torch.linalg.qr(p).Q
        q = error @ p
        if step == iterations - 1:
            q = torch.linalg.qr(q).Q
        p = error.t() @ q
    return backbone + q.half().float() @ p.t().half().float()


def test_gear_keeps_each_rows_extremes_exactly_and_quantizes_the_rest_on_a_narrower_grid():
    # One block of 64 tokens, head_dim 64, rank 0 (outliers and backbone only). Key channel 5
    # holds 100 + t at token t, except 1000 at token 7 and -1000 at token 9: its largest and
    # smallest. Kept exactly; the row's mean (6400 + 2016 - 107 - 109 + 1000 - 1000) / 64 =
    # 128.125 takes their place (inside the rest's range: 0 there would stretch the grid), so the
    # grid is 100..163 in steps of 21 (2 bits), and token t reads 100 + round(t / 21) * 21.
    # Without outliers the grid would span -1000..1000 in steps of 666.7. Every other key channel
    # is 0 but for 1 at token 0 and -1 at token 1 (its extremes, kept): the rest reads 0 exactly.
    # Value token 3 holds 100 + c at channel c but 500 at channel 10 and -500 at 11, the same way.
    R = D = 64
    k = torch.zeros(R, D)
    k[0], k[1] = 1.0, -1.0
    k[:, 5] = 100 + torch.arange(R, dtype=torch.float32)
    k[7, 5], k[9, 5] = 1000.0, -1000.0
    v = torch.zeros(R, D)
    v[:, 0] = 1.0          # every other value token: its extremes are 1 (channel 0) and 0
    v[3] = 100 + torch.arange(D, dtype=torch.float32)
    v[3, 10], v[3, 11] = 500.0, -500.0
    codec = GEARCodec(rank=0)
    fields = codec.encode(k[None], v[None], 0, None)
    # one largest and one smallest per row: 2 x 64 per block, their positions token * 64 + channel
    assert fields["k_out_index"].shape == (1, 128) and fields["v_out_index"].shape == (1, 128)
    kept = dict(zip(fields["k_out_index"][0].tolist(), fields["k_out_value"][0].tolist()))
    assert kept[7 * D + 5] == 1000.0 and kept[9 * D + 5] == -1000.0
    assert kept[0 * D + 6] == 1.0 and kept[1 * D + 6] == -1.0
    kept_v = dict(zip(fields["v_out_index"][0].tolist(), fields["v_out_value"][0].tolist()))
    assert kept_v[3 * D + 10] == 500.0 and kept_v[3 * D + 11] == -500.0
    keys, values = (x[0] for x in codec.decode(fields, 0))
    t = torch.arange(R, dtype=torch.float32)
    expected = 100 + torch.round(t / 21) * 21
    expected[7], expected[9] = 1000.0, -1000.0
    assert torch.equal(keys[:, 5], expected)
    assert torch.equal(keys[:, 6], k[:, 6])
    # value token 3: mean (6400 + 2016 - 110 - 111) / 64 at channels 10, 11; grid 100..163 step 21
    expected_v = 100 + torch.round(t / 21) * 21
    expected_v[10], expected_v[11] = 500.0, -500.0
    assert torch.equal(values[3], expected_v)
    assert torch.equal(values[4], v[4])


def test_gear_reads_back_the_outliers_over_the_codes_and_then_adds_the_low_rank_term():
    # Fields set by hand (rank 1): every code 0, scale 0, zero point 1 (the backbone reads 1
    # everywhere); key outlier at token 3, channel 5 = 100; A = e_3 (token 3), B = 0..63 over the
    # channels. Token 3 reads 1 + c, channel 5 of it 100 + 5 (the official order: the outliers
    # overwrite the backbone, then the low-rank term is added); other tokens read 1.
    R, D = 64, 64
    codec = GEARCodec(rank=1)
    shapes = codec.field_shapes(D)
    fields = {name: torch.zeros(1, *shape, dtype=dtype) for name, (dtype, shape) in shapes.items()}
    fields["k_zero"][:] = 1.0
    fields["v_zero"][:] = 2.0
    fields["k_out_index"][:] = 3 * D + 5      # every slot of the list at one position: one value
    fields["k_out_value"][:] = 100.0
    fields["v_out_index"][:] = 0             # value token 0, channel 0
    fields["v_out_value"][:] = -7.0
    fields["k_a"][0, 3, 0] = 1.0
    fields["k_b"][0, 0] = torch.arange(D, dtype=torch.float16)
    keys, values = (x[0] for x in codec.decode(fields, 0))
    expected = torch.ones(R, D)
    expected[3] += torch.arange(D, dtype=torch.float32)
    expected[3, 5] = 105.0
    assert torch.equal(keys, expected)
    expected_v = torch.full((R, D), 2.0)
    expected_v[0, 0] = -7.0
    assert torch.equal(values, expected_v)


def test_power_iteration_recovers_an_error_of_rank_r_exactly():
    # E = u1 w1^T * 4 + u2 w2^T, rank 2, with orthonormal u's: any start with a component along
    # both finds their span in one round, so A B = E and A's columns are orthonormal.
    R, D = 64, 64
    u = torch.zeros(R, 2)
    u[0, 0], u[1, 0] = 0.6, 0.8
    u[5, 1] = 1.0
    w = torch.zeros(2, D)
    w[0, :8] = 4.0
    w[1, 30] = -2.0
    error = (u @ w)[None]
    a, b = power_iteration(error, 2, 3)
    assert torch.allclose(a @ b, error, atol=1e-5)
    assert torch.allclose(a[0].t() @ a[0], torch.eye(2), atol=1e-5)


@pytest.mark.parametrize("bits,head_dim,group", [(2, 64, 64), (4, 64, 64), (2, 128, 32)])
def test_gear_codec_is_its_plain_restatement(bits, head_dim, group):
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(3, 64, head_dim, generator=gen)
    k[..., 2] *= 15                                  # an outlier channel, as real keys have
    v = torch.randn(3, 64, head_dim, generator=gen)
    codec = GEARCodec(bits=bits, group_size=group)
    keys, values = codec.decode(codec.encode(k, v, 0, None), 0)
    for n in range(3):
        assert torch.allclose(keys[n], restated_gear(k[n], True, bits, group), atol=2e-3)
        assert torch.allclose(values[n], restated_gear(v[n], False, bits, group), atol=2e-3)


def test_gears_low_rank_term_and_outliers_each_cut_the_error():
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(4, 64, 64, generator=gen) + torch.randn(4, 1, 64, generator=gen) * 4   # per-channel offsets
    k[:, torch.arange(4) * 16, 3] = 40.0                                                   # spikes
    errors = {}
    for rank, share in ((0, 0.0), (0, 0.02), (2, 0.0), (2, 0.02)):
        codec = GEARCodec(rank=rank, outliers=share)
        keys, _ = codec.decode(codec.encode(k, k, 0, None), 0)
        errors[rank, share] = float((keys - k).norm() / k.norm())
    assert errors[0, 0.02] < 0.9 * errors[0, 0.0]          # outliers out of the grid
    assert errors[2, 0.0] < 0.9 * errors[0, 0.0]           # the low-rank term
    assert errors[2, 0.02] < min(errors[0, 0.02], errors[2, 0.0])


def test_gear_bytes_are_its_fields_and_a_quarter_of_float16():
    # default: 2 bits, 64-token blocks, head_dim 64, group 64, rank 2, 2% outliers. Per block:
    # K and V codes 2 x 64 x 16 B = 2048; key scale + zero 2 x 64 x 2 (one group of 64 tokens per
    # channel) = 256; value scale + zero 2 x 64 x 2 (one group of 64 channels per token) = 256;
    # A [64, 2] + B [2, 64] float16 = 512, for K and V = 1024; outliers one top + one bottom per
    # row, 128 per block, int16 + float16 = 512, for K and V = 1024. 4608 B / 64 tokens = 72 B a
    # token, against 2 x 64 x 2 = 256 in float16 (28%).
    codec = make_method("gear").quantization
    shapes = codec.field_shapes(64)
    assert shapes["k_out_index"] == (torch.int16, (128,)) and shapes["v_out_value"] == (torch.float16, (128,))
    assert shapes["k_a"] == (torch.float16, (64, 2)) and shapes["v_b"] == (torch.float16, (2, 64))
    assert codec.quantized_bytes(64) == 4608
    assert make_method("gear", bits=4).quantization.quantized_bytes(64) == 4608 + 2048
    assert make_method("gear", rank=0, outliers=0).quantization.quantized_bytes(64) == 2560   # KIVI's fields only
    # head_dim 128: codes 2 x 64 x 32, scales 2 x 2 x 128 x 2 (keys) + 2 x 64 x 2 x 2 (values: 2 groups),
    # factors 2 x (64 x 2 + 2 x 128) x 2, outliers K 2 x 128 rows, V 2 x 64 rows (round(1.28) = 1), x 4 B
    assert codec.quantized_bytes(128) == 4096 + 1024 + 1536 + (256 + 128) * 4


def test_gears_cold_blocks_hold_its_fields_and_decode_to_the_codecs_reading():
    codec = GEARCodec()
    cache, _ = cache_with(codec)
    gen = torch.Generator().manual_seed(0)
    n = 150
    k, v = torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)
    cache.add(7)
    for layer in range(2):
        cache.write(cache.append_slots(7, n, layers=slice(layer, layer + 1))[0], k, v, torch.arange(n))
    cache.settle(7)
    s = cache.seqs[7]
    assert s.num_cold.tolist() == [[2, 2], [2, 2]] and s.lengths.tolist() == [[22, 22], [22, 22]]
    assert cache.theoretical_bytes(7) == 4 * (2 * 4608 + 22 * (2 * 64 * 4 + 4))
    expected_k, expected_v = codec.decode(codec.encode(k[:128].transpose(0, 1).reshape(4, 64, 64),
                                                       v[:128].transpose(0, 1).reshape(4, 64, 64), 0, None), 0)
    for layer in range(2):
        keys, values = cache.decoded_cold(s.cold_tables[layer][None, :, :2], layer)
        assert torch.equal(keys[0], expected_k.reshape(2, 128, 64))
        assert torch.equal(values[0], expected_v.reshape(2, 128, 64))
    cache.free(7)
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "bits=3 of method 'gear' must be 2 or 4"),
    ({"rank": -1}, "rank=-1 of method 'gear' must be an integer in [0, 16]"),
    ({"outliers": 0.6}, "outliers=0.6 of method 'gear' must be a share in [0, 0.5)"),
    ({"residual_length": 96}, "residual_length=96 of method 'gear' must be a multiple of group_size=64"),
    ({"iterations": 0}, "iterations=0 of method 'gear' must be a positive number"),
])
def test_gear_refuses_bad_options_naming_the_value_and_the_valid_ones(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_method("gear", **options)


def test_gear_refuses_a_group_that_does_not_divide_head_dim():
    with pytest.raises(ValueError, match="head_dim=48 is not a multiple of group_size=64"):
        GEARCodec().field_shapes(48)


# --- DecoQuant --------------------------------------------------------------------------------

def restated_decoquant(x: torch.Tensor, is_key: bool, bits=4, width=16):
    """One block x [R, D] as DecoQuant stores and reads it, in plain torch: M = x as rows of
    `width` consecutive channels [R * D / width, width] = U S V^T; the large core U S^(1/2), per
    token (its D / width rows) quantized symmetric to round(G / s), s = max |G| / (2^(b-1) - 1) in
    float16; the small core S^(1/2) V^T in float16; read back as the product."""
    R, D = x.shape
    u, s, vt = torch.linalg.svd(x.float().reshape(R * D // width, width), full_matrices=False)
    large = (u * s.sqrt()).reshape(R, D)
    small = (s.sqrt()[:, None] * vt).half().float()
    top = 2 ** (bits - 1) - 1
    scale = (large.abs().amax(1, keepdim=True).clamp(min=1e-5) / top).half().float()
    read = (large / scale).round().clamp(-top, top) * scale
    return (read.reshape(R * D // width, width) @ small).reshape(R, D)


def test_decoquant_moves_an_outlier_channel_into_the_small_tensor_and_reads_a_rank_one_block_back():
    # x[t, c] = a_t * b_c over 16 tokens and 16 channels (one row of the small tensor's width), with
    # channel 3 of b an outlier (50 against 1). M = x is rank one: sigma = |a| |b|, and the large
    # core is a / |a| * sqrt(sigma) in its first column, 0 elsewhere: every token's largest entry
    # is its only one, so it is exactly a code of +-7 (4 bits), and x reads back to float16
    # rounding. The small core's first row is sqrt(sigma) * b / |b|: the outlier is there (50 times
    # the rest), not in the quantized core. Per-token quantization of x itself at 4 bits has a
    # step of 50 |a_t| / 7 and reads every other channel as 0.
    a = torch.linspace(-2, 3, 16)
    a[6] = 0.0                                         # -2 + 5 * 6 / 15, up to float rounding
    b = torch.ones(16)
    b[3] = 50.0
    x = torch.outer(a, b)
    codec = DecoQuantCodec(bits=4, block_size=16)
    fields = codec.encode(x[None], x[None], 0, None)
    small = fields["k_small"][0].float()
    assert torch.allclose(small[0].abs() / small[0, 0].abs(), b, rtol=1e-3)
    assert torch.allclose(small[1:], torch.zeros(15, 16), atol=1e-3)
    codes = fields["k_codes"][0]                       # two 4-bit codes a byte, offset by 7
    first = codes[:, 0] & 15                           # +-7 by a_t's sign (a_6 = 0: code 0), up to U's sign
    expected = torch.where(a > 0, 14, torch.where(a < 0, 0, 7)).to(torch.uint8)
    assert torch.equal(first, expected) or torch.equal(first, 14 - expected)
    assert (codes[:, 1:] == 7 * 16 + 7).all() and (codes[:, 0] >> 4 == 7).all()
    keys, _ = codec.decode(fields, 0)
    assert torch.allclose(keys[0], x, rtol=2e-3, atol=1e-3)


def test_decoquant_reads_the_large_cores_codes_times_their_scale_through_the_small_core():
    # Fields by hand (2 bits: codes -1, 0, 1 stored as 0, 1, 2; 16 tokens, head_dim 32, two rows
    # of 16 per token): token 0's large core is 1 at (row 0, bond 0) and -1 at (row 1, bond 2),
    # scale 3; the small core has row 0 = 0..15 and row 2 = all 2. Token 0 reads 3 * (0..15) on
    # channels 0..15 and -3 * 2 = -6 on channels 16..31; every other token (all codes 1 = 0) reads 0.
    codec = DecoQuantCodec(bits=2, block_size=16)
    shapes = codec.field_shapes(32)
    assert shapes["k_codes"] == (torch.uint8, (16, 8)) and shapes["k_small"] == (torch.float16, (16, 16))
    codes = torch.ones(16, 32, dtype=torch.uint8)     # code 1: zero
    codes[0, 0], codes[0, 16 + 2] = 2, 0
    packed = (codes.view(16, 8, 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8)).sum(-1).to(torch.uint8)
    small = torch.zeros(16, 16, dtype=torch.float16)
    small[0] = torch.arange(16, dtype=torch.float16)
    small[2] = 2.0
    fields = {"k_codes": packed[None], "k_scale": torch.full((1, 16), 3.0, dtype=torch.float16), "k_small": small[None],
              "v_codes": packed[None], "v_scale": torch.zeros(1, 16, dtype=torch.float16), "v_small": small[None]}
    keys, values = codec.decode(fields, 0)
    expected = torch.zeros(16, 32)
    expected[0, :16] = 3 * torch.arange(16, dtype=torch.float32)
    expected[0, 16:] = -6.0
    assert torch.equal(keys[0], expected)
    assert torch.equal(values[0], torch.zeros(16, 32))


@pytest.mark.parametrize("bits,head_dim,width", [(4, 64, 16), (2, 64, 16), (8, 128, 16), (4, 64, 8)])
def test_decoquant_codec_is_its_plain_restatement(bits, head_dim, width):
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(2, 128, head_dim, generator=gen)
    k[..., 5] *= 20
    v = torch.randn(2, 128, head_dim, generator=gen)
    codec = DecoQuantCodec(bits=bits, width=width)
    keys, values = codec.decode(codec.encode(k, v, 0, None), 0)
    for n in range(2):
        assert torch.allclose(keys[n], restated_decoquant(k[n], True, bits, width), atol=1e-3)
        assert torch.allclose(values[n], restated_decoquant(v[n], False, bits, width), atol=1e-3)


def test_decoquant_halves_the_error_of_quantizing_the_tokens_themselves():
    # the paper's baseline: per-token absmax (RTN) of x at the same bits, one scale per token
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 128, 64, generator=gen)
    x[..., 5] *= 20
    x[..., 40] += 10
    scale = (x.abs().amax(-1, keepdim=True) / 7).half().float()
    naive = (x / scale).round().clamp(-7, 7) * scale
    codec = DecoQuantCodec(bits=4)
    keys, _ = codec.decode(codec.encode(x, x, 0, None), 0)
    assert (keys - x).norm() < 0.6 * (naive - x).norm()


def test_decoquant_bytes_are_its_fields():
    # default 4 bits, 128-token blocks, head_dim 64: codes 128 x 32 B = 4096, a float16 scale a
    # token 256, the small core 16 x 16 x 2 = 512: 4864 for K, as much for V; 9728 / 128 = 76 B a
    # token against 256 in float16. 2 bits: codes 2048, so 5632 / 128 = 44 B a token.
    assert make_method("decoquant").quantization.quantized_bytes(64) == 9728
    assert make_method("decoquant", bits=2).quantization.quantized_bytes(64) == 5632
    assert make_method("decoquant", bits=8, residual_length=64).quantization.quantized_bytes(128) == \
        2 * (64 * 128 + 64 * 2 + 512)


def test_decoquants_cold_blocks_hold_its_fields_and_decode_to_the_codecs_reading():
    codec = DecoQuantCodec()
    cache, _ = cache_with(codec)
    gen = torch.Generator().manual_seed(0)
    n = 150
    k, v = torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)
    cache.add(3)
    for layer in range(2):
        cache.write(cache.append_slots(3, n, layers=slice(layer, layer + 1))[0], k, v, torch.arange(n))
    cache.settle(3)
    s = cache.seqs[3]
    assert s.num_cold.tolist() == [[1, 1], [1, 1]] and s.lengths.tolist() == [[22, 22], [22, 22]]
    assert cache.theoretical_bytes(3) == 4 * (9728 + 22 * (2 * 64 * 4 + 4))
    expected_k, expected_v = codec.decode(codec.encode(k[:128].transpose(0, 1), v[:128].transpose(0, 1), 0, None), 0)
    for layer in range(2):
        keys, values = cache.decoded_cold(s.cold_tables[layer][None, :, :1], layer)
        assert torch.allclose(keys[0], expected_k, atol=1e-6) and torch.allclose(values[0], expected_v, atol=1e-6)
    cache.free(3)
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "bits=3 of method 'decoquant' must be 2, 4 or 8"),
    ({"residual_length": 20}, "residual_length=20 of method 'decoquant' must be a positive multiple of 16"),
    ({"width": 12}, "width=12 of method 'decoquant' must be a power of two in [2, 64]"),
])
def test_decoquant_refuses_bad_options_naming_the_value_and_the_valid_ones(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        make_method("decoquant", **options)


def test_decoquant_refuses_a_head_dim_its_width_does_not_divide():
    with pytest.raises(ValueError, match="head_dim=40 is not a multiple of the small tensor's width=16"):
        DecoQuantCodec().field_shapes(40)


# --- both, in the engine on real weights ------------------------------------------------------

class DenseCodec:
    """A plain statement of a codec on the tiered cache, as the model's attention callable: per
    layer the read-back cold tokens and the full-precision residual; prefill attends in full
    precision and then compresses every whole `block` tokens of each head with `restate(x [R, D],
    is_key)`; each decode token attends over both and, once the residual holds `block` tokens,
    they are compressed."""

    def __init__(self, block, restate):
        self.block, self.restate = block, restate
        self.layers = {}

    def __call__(self, layer, q, k, v, sliding_window):
        kq, vq, kf, vf = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0]))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        keys, values = torch.cat([kq, kf]), torch.cat([vq, vf])
        out = attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))
        cut = len(kf) // self.block * self.block
        for s in range(0, cut, self.block):
            kq = torch.cat([kq, torch.stack([self.restate(kf[s:s + self.block, h], True) for h in range(k.shape[1])], 1)])
            vq = torch.cat([vq, torch.stack([self.restate(vf[s:s + self.block, h], False) for h in range(v.shape[1])], 1)])
        self.layers[layer] = (kq, vq, kf[cut:], vf[cut:])
        return out


@pytest.mark.parametrize("method,restate,block,block_bytes,prompt_len,steps", [
    ("gear", restated_gear, 64, 4608, 150, 45),            # 2 blocks at prefill, a third at 192
    ("decoquant", restated_decoquant, 128, 9728, 200, 60),  # 1 block at prefill, a second at 256
])
@pytest.mark.slow
def test_engine_matches_the_plain_restatement(smollm2_gguf, method, restate, block, block_bytes, prompt_len, steps):
    """Greedy tokens through the engine (the codec's fields in cold blocks, flushes in settle, the
    twin's attention) and through DenseCodec, across flushes at prefill and during decode."""
    from nanokv import LLM, SamplingParams

    prompt = list(range(1000, 1000 + prompt_len))
    llm = LLM(str(smollm2_gguf), dtype="float32", method=method)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    tokens = restated_greedy(llm.model, DenseCodec(block, restate), prompt, steps)
    assert out.token_ids == tokens
    held = out.metrics["kv_cache_tokens"]
    assert out.metrics["kv_cache_bytes_theory"] == 30 * 3 * (held // block * block_bytes + held % block * (2 * 64 * 4 + 4))


@pytest.mark.parametrize("quantizer", ["gear", "decoquant"])
@pytest.mark.slow
def test_snapkv_then_a_quantizer_keeps_snapkvs_tokens_in_fewer_bytes(smollm2_gguf, quantizer):
    from nanokv import LLM, SamplingParams

    prompt, held = list(range(2000, 2300)), {}
    for method in ("snapkv", f"snapkv+{quantizer}"):
        llm = LLM(str(smollm2_gguf), dtype="float32", method=method, compression=0.5, window_size=8)
        finish = llm.scheduler.finish

        def capture(seq, llm=llm, finish=finish, method=method):
            s = llm.cache.seqs[seq.id]
            cold = llm.cache.quantized_lengths(seq.id) if method != "snapkv" else 0
            held[method] = (s.lengths + cold, s.lengths.clone(), cold)
            finish(seq)

        llm.scheduler.finish = capture
        [out] = llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        held[method] += (out.metrics["kv_cache_bytes"],)
    tokens, _, _, full_bytes = held["snapkv"]
    quant_tokens, residual, cold, quant_bytes = held[f"snapkv+{quantizer}"]
    assert torch.equal(tokens, quant_tokens) and (tokens == 150).all()   # snapkv keeps 150 of 300
    assert (cold == 128).all() and (residual == 22).all()                # 128 tokens in cold blocks
    assert quant_bytes < full_bytes / 2
