"""GEAR and DecoQuant (issue 28, wave 5 group a): codecs of the tiered cache's cold blocks. Each on
hand-built blocks whose stored fields and read-back values are worked out by hand, against a
plain restatement of its algorithm (the codec's decode, and the engine's greedy tokens on real
weights), its bytes as stored, after snapkv, and its options."""

from types import SimpleNamespace

import pytest
import torch

from helpers import restated_greedy
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.methods.gear import GEARCodec, power_iteration


def fake_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """x quantized and read back (as tests/test_quant_cache.py states it): each run of `group`
    entries along `dim` gets the grid min + k * (max - min) / (2^bits - 1), its scale and min
    rounded to float16 as stored."""
    x = x.float().movedim(dim, -1)
    g = x.unflatten(-1, (-1, group))
    low = g.amin(-1, keepdim=True).half().float()
    scale = ((g.amax(-1, keepdim=True) - low) / (2 ** bits - 1)).half().float()
    codes = torch.where(scale > 0, ((g - low) / torch.where(scale > 0, scale, 1)).round(), 0).clamp(0, 2 ** bits - 1)
    return (codes * scale + low).flatten(-2).movedim(-1, dim)


def tiny_config(layers=2, heads=2, head_dim=64):
    return SimpleNamespace(num_layers=layers, num_kv_heads=heads, head_dim=head_dim)


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
    out = rows.clone()
    n = max(1, round(share / 2 * rows.shape[1])) if share else 0
    picked = []
    for i, row in enumerate(rows):
        if n:
            idx = torch.cat([row.topk(n).indices, row.topk(n, largest=False).indices])
            picked.append((i, idx, row[idx].half().float()))
            out[i, idx] = row.mean()
    out = out.t() if is_key else out
    backbone = fake_quant(out, bits, group, dim=0 if is_key else 1)
    for i, idx, values in picked:
        if is_key:
            backbone[idx, i] = values
        else:
            backbone[i, idx] = values
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


@pytest.mark.slow
def test_gear_engine_matches_its_plain_restatement(smollm2_gguf):
    """Greedy tokens through the engine (GEAR's fields in cold blocks, flushes in settle, the twin's
    attention) and through DenseCodec with restated_gear, across flushes at prefill and decode."""
    from nanokv import LLM, SamplingParams

    prompt, steps = list(range(1000, 1150)), 50   # 150 tokens: 2 blocks at prefill, a third at 192
    llm = LLM(str(smollm2_gguf), dtype="float32", method="gear")
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    tokens = restated_greedy(llm.model, DenseCodec(64, restated_gear), prompt, steps)
    assert out.token_ids == tokens
    held = out.metrics["kv_cache_tokens"]
    assert out.metrics["kv_cache_bytes_theory"] == 30 * 3 * (held // 64 * 4608 + held % 64 * (2 * 64 * 4 + 4))


@pytest.mark.slow
def test_snapkv_then_gear_keeps_snapkvs_tokens_in_fewer_bytes(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    prompt, held = list(range(2000, 2300)), {}
    for method in ("snapkv", "snapkv+gear"):
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
    gear_tokens, residual, cold, gear_bytes = held["snapkv+gear"]
    assert torch.equal(tokens, gear_tokens) and (tokens == 150).all()   # snapkv keeps 150 of 300
    assert (cold == 128).all() and (residual == 22).all()               # two 64-token blocks
    assert gear_bytes < full_bytes / 2
