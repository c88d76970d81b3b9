"""The ranking (mixed-precision-by-token) quantizers of issue 28: zipcache, mikv, qaq.

Hand-built cases for the shared block layout (methods/mixed_precision.py: rows sorted by
importance, a high and a low tier) and for each method's importance; a plain restatement of
each codec (sort, quantize, read back, written out here) against its encode + decode, and of
each method end to end against the engine's greedy tokens; the bytes as stored; snapkv+<method>;
bad options."""

import math
import re

import pytest
import torch

from helpers import restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods.base import PrefillView
from nanokv.methods.mikv import accumulated_attention
from nanokv.methods.mixed_precision import MixedPrecisionCodec, Tier
from nanokv.methods.qaq import recent_max_attention
from nanokv.methods.registry import make_method
from nanokv.methods.zipcache import normalized_attention, probe_queries

F16 = torch.float16


def f16(x) -> torch.Tensor:
    """x rounded to float16, as a stored scale is, back in float32."""
    return torch.as_tensor(x, dtype=torch.float32).half().float()


# --- a plain restatement of a tier: written out independently of nanokv/kernels/quant.py ----------

def grid(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x on the asymmetric grid of `bits` bits spanning its min..max along `dim` (scale and min
    float16 as stored)."""
    low = f16(x.amin(dim, keepdim=True))
    scale = f16((x.amax(dim, keepdim=True) - low) / (2 ** bits - 1))
    codes = torch.where(scale > 0, ((x - low) / torch.where(scale > 0, scale, 1)).round(), 0).clamp(0, 2 ** bits - 1)
    return codes * scale + low


def plain_tier(x: torch.Tensor, bits: int, channel=False, separable=False, outliers=0.0) -> torch.Tensor:
    """x [rows, D] as the tier reads it back."""
    if len(x) == 0:
        return x
    if bits == 16:
        return f16(x)
    if channel:
        return grid(x, bits, 0)
    c = f16(x.abs().amax(0).sqrt()) if separable else torch.ones(x.shape[1])
    x = x / c
    D = x.shape[1]
    lo, hi = (math.ceil(outliers / 2 * D), D - math.floor((1 - outliers / 2) * D)) if outliers else (0, 0)
    ranked = x.sort(dim=1).values
    inside = x.clamp(ranked[:, lo:lo + 1], ranked[:, D - hi - 1:D - hi])
    out = grid(inside, bits, 1)
    out = torch.where((x < ranked[:, lo:lo + 1]) | (x > ranked[:, D - hi - 1:D - hi]), f16(x), out)
    return out * c


# the tiers each method stores with: (k_hi, k_lo, v_hi, v_lo) as plain_tier keyword arguments
def plain_block(k, v, importance, hi_rows, tiers):
    """k, v [R, D], importance [R] -> k, v read back, rows most important first (stable)."""
    order = importance.argsort(descending=True, stable=True)
    k, v = k[order].float(), v[order].float()
    (k_hi, k_lo, v_hi, v_lo), (nk, nv) = tiers, hi_rows
    return (torch.cat([plain_tier(k[:nk], **k_hi), plain_tier(k[nk:], **k_lo)]),
            torch.cat([plain_tier(v[:nv], **v_hi), plain_tier(v[nv:], **v_lo)]))


PLAIN = {  # method -> (block size, (key, value) high rows, tiers) at the defaults
    "zipcache": (100, (60, 60), ({"bits": 4, "channel": True}, {"bits": 2, "channel": True},
                                 {"bits": 4, "separable": True}, {"bits": 2, "separable": True})),
    "mikv": (128, (26, 26), ({"bits": 16}, {"bits": 2, "separable": True}, {"bits": 16}, {"bits": 2})),
    "qaq": (128, (64, 32), ({"bits": 4, "outliers": 0.01}, {"bits": 2, "outliers": 0.01},
                            {"bits": 4, "outliers": 0.01}, {"bits": 2, "outliers": 0.01})),
}


# --- the tiers, by hand ------------------------------------------------------------------------

def test_a_token_grid_tier_by_hand():
    tier = Tier(2, 2)
    x = torch.tensor([[[0.0, 1, 2, 3], [1, 2.2, 4, 2.9]]])
    fields = tier.encode(x)
    # row 0: min 0, step 1, codes 0 1 2 3, packed first code lowest: 0 + 1*4 + 2*16 + 3*64
    assert fields["codes"].tolist() == [[[228], [0 + 1 * 4 + 3 * 16 + 2 * 64]]]
    assert fields["scale"].tolist() == [[1.0, 1.0]] and fields["zero"].tolist() == [[0.0, 1.0]]
    # row 1: min 1, step 1: 2.2 -> 2, 2.9 -> 3
    assert tier.decode(fields, (1,), 4, "cpu").tolist() == [[[0, 1, 2, 3], [1, 2, 4, 3]]]


def test_a_channel_grid_tier_by_hand():
    tier = Tier(2, 4, "channel")
    x = torch.tensor([[[0.0, 0, 0, 0], [1, 4, 1, 1], [2, 9, 2, 2], [3, 9, 3, 3]]])
    fields = tier.encode(x)
    assert fields["scale"].tolist() == [[1.0, 3.0, 1.0, 1.0]]  # a grid per channel: (3 - 0) / 3, (9 - 0) / 3
    # channel 1: 4 / 3 rounds to 1 step of 3
    assert tier.decode(fields, (1,), 4, "cpu").tolist() == [[[0, 0, 0, 0], [1, 3, 1, 1], [2, 9, 2, 2], [3, 9, 3, 3]]]


def test_a_channel_separable_tier_by_hand():
    """Each channel divided by sqrt(max |x_c|) = 4, 1, 2, 2, then a 2-bit grid per row, then
    multiplied back."""
    tier = Tier(2, 2, separable=True)
    x = torch.tensor([[[16.0, 1, 4, 0], [4, 0.25, 1, 4]]])
    fields = tier.encode(x)
    assert fields["cscale"].tolist() == [[4, 1, 2, 2]]
    # row 0 / c = 4 1 2 0: step 4/3 (float16), codes 3 1 2 0 (1 / (4/3) = .75 -> 1, 2 / (4/3) = 1.5 -> 2);
    # row 1 / c = 1 .25 .5 2: min .25, step 1.75/3, codes 1 0 0 3 (.75 / .583 = 1.29, .25 / .583 = .43)
    s0, s1 = float(f16(4 / 3)), float(f16(1.75 / 3))  # floats: torch.tensor of 0-d tensors fails under a function mode
    want = torch.tensor([[3 * s0 * 4, s0 * 1, 2 * s0 * 2, 0],
                         [(0.25 + s1) * 4, 0.25, 0.25 * 2, (0.25 + 3 * s1) * 2]])
    assert torch.allclose(tier.decode(fields, (1,), 4, "cpu")[0], want, atol=1e-6)


def test_outliers_are_kept_apart_from_the_grid_by_hand():
    """outliers_ratio 0.25 at D = 8: the lowest ceil(1) and the highest 8 - floor(7) = 1 entries."""
    tier = Tier(2, 1, outliers_ratio=0.25)
    x = torch.tensor([[[0.0, 1, 2, 3, 100, -50, 1.4, 2.9]]])
    fields = tier.encode(x)
    assert fields["oidx"].tolist() == [[[5, 4]]] and fields["oval"].tolist() == [[[-50, 100]]]
    # the grid spans 0..3 (not -50..100): step 1
    assert tier.decode(fields, (1,), 8, "cpu").tolist() == [[[0, 1, 2, 3, 100, -50, 1, 3]]]


def test_a_block_is_stored_most_important_first_in_its_tiers():
    codec = MixedPrecisionCodec(4, (Tier(16, 1), Tier(2, 3)), (Tier(16, 1), Tier(2, 3)))
    k = torch.tensor([[[0.0, 3, 1, 2], [5.5, -1.25, 0, 1], [1, 2, 4, 3], [3, 0, 6, 9]]])
    v = k * 2
    fields = codec.encode(k, v, 0, torch.tensor([[0.1, 0.9, 0.0, 0.1]]))
    assert set(fields) == {"k_hi_values", "k_lo_codes", "k_lo_scale", "k_lo_zero",
                           "v_hi_values", "v_lo_codes", "v_lo_scale", "v_lo_zero"}
    keys, values = codec.decode(fields, 0)
    # row 1 (0.9) in float16 as is; then rows 0 and 3 (0.1, in their order), then row 2 (0.0),
    # each on its own 2-bit grid over its 4 channels (each row's entries lie on it)
    assert keys.tolist() == [[[5.5, -1.25, 0, 1], [0, 3, 1, 2], [3, 0, 6, 9], [1, 2, 4, 3]]]
    assert values.tolist() == [[[11, -2.5, 0, 2], [0, 6, 2, 4], [6, 0, 12, 18], [2, 4, 8, 6]]]
    # no importance (or all equal): the order they came in, row 0 in float16; row 1 now on a
    # 2-bit grid from -1.25 in steps of 2.25 (0 -> 1 step: 1.0, 1 -> 1 step: 1.0)
    keys, _ = codec.decode(codec.encode(k, v, 0, None), 0)
    assert keys.tolist() == [[[0, 3, 1, 2], [5.5, -1.25, 1, 1], [1, 2, 4, 3], [3, 0, 6, 9]]]


def test_bad_tiers_are_refused():
    with pytest.raises(ValueError, match="bits must be one of"):
        Tier(3, 1)
    with pytest.raises(ValueError, match="grid must be one of"):
        Tier(2, 1, "group")
    with pytest.raises(ValueError, match="hold 3 rows, not block_size=4"):
        MixedPrecisionCodec(4, (Tier(16, 1), Tier(2, 2)), (Tier(16, 1), Tier(2, 3)))


# --- each method's importance, by hand -----------------------------------------------------------

def uniform_view(T=3, Hq=2, H=1, D=4):
    """Zero queries: each query attends uniformly to the keys it sees (query j: 1 / (j + 1) each)."""
    return PrefillView(0, 1, torch.zeros(T, Hq, D), torch.randn(H, T, D), torch.arange(T))


def test_zipcache_saliency_is_attention_over_the_queries_that_see_each_token():
    # with every query a probe: key 0 gets 1 + 1/2 + 1/3 from 3 queries, key 1 1/2 + 1/3 from 2, key 2 1/3 from 1
    score = normalized_attention(uniform_view(), torch.arange(3))
    assert torch.allclose(score, torch.tensor([[11 / 18, 5 / 12, 1 / 3]]))
    # two probes, the newest two: key 0 gets 1/2 + 1/3 from 2 queries, key 1 too, key 2 1/3 from 1
    score = normalized_attention(uniform_view(), torch.tensor([1, 2]))
    assert torch.allclose(score, torch.tensor([[5 / 12, 5 / 12, 1 / 3]]))


def test_zipcache_probes_are_the_newest_and_a_hashed_draw_of_the_rest():
    positions = torch.arange(100, 140)
    probes = probe_queries(40, 0.05, 0.05, 3, positions)
    assert len(probes) == 4 and probes[-2:].tolist() == [38, 39] and (probes[:2] < 38).all()
    assert probes[0] < probes[1]
    assert torch.equal(probes, probe_queries(40, 0.05, 0.05, 3, positions))  # the same every time
    assert not torch.equal(probes, probe_queries(40, 0.05, 0.05, 4, positions))  # another layer draws anew
    assert probe_queries(40, 1.0, 0.05, 3, positions).tolist() == list(range(40))


def test_mikv_importance_is_h2o_accumulated_attention():
    assert torch.allclose(accumulated_attention(uniform_view()), torch.tensor([[11 / 6, 5 / 6, 1 / 3]]))


def test_qaq_importance_is_the_most_attention_from_the_newest_queries():
    assert torch.allclose(recent_max_attention(uniform_view(), 5), torch.tensor([[1, 1 / 2, 1 / 3]]))
    assert torch.allclose(recent_max_attention(uniform_view(), 1), torch.tensor([[1 / 3, 1 / 3, 1 / 3]]))


# --- the codecs against a plain restatement ------------------------------------------------------

@pytest.mark.parametrize("method", list(PLAIN))
def test_each_codec_matches_a_plain_restatement(method):
    R, hi_rows, tiers = PLAIN[method]
    codec = make_method(method).quantization
    torch.manual_seed(0)
    k, v = torch.randn(3, R, 64) * torch.linspace(0.2, 6, 64), torch.randn(3, R, 64)
    importance = torch.rand(3, R)
    importance[:, -10:] = 0  # decode tokens: after the prompt's, in their order
    keys, values = codec.decode(codec.encode(k, v, 0, importance), 0)
    for b in range(3):
        want_k, want_v = plain_block(k[b], v[b], importance[b], hi_rows, tiers)
        assert torch.allclose(keys[b], want_k, atol=1e-4, rtol=1e-4)
        assert torch.allclose(values[b], want_v, atol=1e-4, rtol=1e-4)


# --- bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,R,stored", [
    # zipcache, 100 tokens: K 60 rows x 32 B + a 4-bit grid per channel (2 x 64 x 2 B), 40 x 16 B + one
    # 2-bit; V 60 x 32 + 60 x 4 (scale, zero) + 128 (channel scales), 40 x 16 + 40 x 4 + 128
    ("zipcache", 100, 60 * 32 + 256 + 40 * 16 + 256 + 60 * 32 + 60 * 4 + 128 + 40 * 16 + 40 * 4 + 128),
    # mikv, 128 tokens: 26 float16 rows (128 B) of K and of V; 102 2-bit rows (16 B + 4 B) each, K's
    # channel balancer 128 B
    ("mikv", 128, 2 * 26 * 128 + 102 * 20 + 128 + 102 * 20),
    # qaq: 64 4-bit keys, 64 2-bit; 32 4-bit values, 96 2-bit; each row scale + zero (4 B) and two
    # outliers (a uint8 index and a float16 value each: 6 B)
    ("qaq", 128, 64 * 42 + 64 * 26 + 32 * 42 + 96 * 26),
])
def test_the_stored_bytes_are_the_fields(method, R, stored):
    codec = make_method(method).quantization
    assert codec.block_size == R and codec.quantized_bytes(64) == stored
    fields = codec.encode(torch.randn(1, R, 64), torch.randn(1, R, 64), 0, torch.rand(1, R))
    shapes = codec.field_shapes(64)
    assert set(fields) == set(shapes)
    for name, value in fields.items():
        assert tuple(value.shape[1:]) == shapes[name][1]
    assert sum(shapes[n][0].itemsize * value[0].numel() for n, value in fields.items()) == stored
    assert stored < R * 2 * 64 * 2 / 2.9  # under float16's 256 B a token by far


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,option,value,valid", [
    ("zipcache", "high_bits", 3, "2, 4 or 8"),
    ("zipcache", "salient_share", 1.5, "a number in [0, 1]"),
    ("mikv", "high_bits", 4, "8 or 16"),
    ("mikv", "low_bits", 1, "2, 4 or 8"),
    ("qaq", "outliers_ratio", 0.9, "a number in [0, 0.5]"),
    ("qaq", "residual_length", 1, "an integer >= 2"),
])
def test_bad_options_name_the_value_and_the_valid_choices(method, option, value, valid):
    for spec in (method, f"snapkv+{method}"):
        with pytest.raises(ValueError, match=rf"{option}={value!r}.*must be {re.escape(valid)}"):
            make_method(spec, compression=0.5 if "+" in spec else 0.0, **{option: value})
    with pytest.raises(ValueError, match="does not compress"):
        make_method(method, compression=0.5)


# --- end to end, on real weights -----------------------------------------------------------------

class DenseRanked:
    """A plain statement of a ranking codec on the tiered cache, as the model's attention callable:
    per layer the cold rows (read back) and the full-precision residual with each token's
    importance. Prefill attends in full precision, ranks the prompt (the method's importance,
    `rank(q, k, positions)`), then stores every whole R tokens as a block (plain_block); decode
    tokens carry importance 0 and attend over both; a full residual becomes a block."""

    def __init__(self, method, rank):
        self.R, self.hi_rows, self.tiers = PLAIN[method]
        self.rank, self.layers = rank, {}

    def __call__(self, layer, q, k, v, sliding_window):
        kc, vc, kf, vf, imp = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0], torch.zeros(0)))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        keys, values = torch.cat([kc, kf]), torch.cat([vc, vf])
        positions = torch.cat([torch.zeros(len(kc), dtype=torch.long), self.positions[-1] - len(kf) + 1 +
                               torch.arange(len(kf))])
        out = attention_by_position(q, keys, values, self.positions, positions)
        if len(q) > 1:  # the prompt: ranked per kv-head
            imp = self.rank(q, k.transpose(0, 1), self.positions)           # [H, T]
        else:
            imp = torch.cat([imp, torch.zeros(imp.shape[0], 1)], dim=1)
        R = self.R
        while kf.shape[0] >= R:
            blocks = [plain_block(kf[:R, h], vf[:R, h], imp[h, :R], self.hi_rows, self.tiers)
                      for h in range(kf.shape[1])]
            kc = torch.cat([kc, torch.stack([b[0] for b in blocks], dim=1)])
            vc = torch.cat([vc, torch.stack([b[1] for b in blocks], dim=1)])
            kf, vf, imp = kf[R:], vf[R:], imp[:, R:]
        self.layers[layer] = (kc, vc, kf, vf, imp)
        return out


def plain_rank(method):
    """Each method's importance written out: attention of (some) prompt queries, in plain torch."""
    def probs(q, k, positions, rows):
        Hq, H = q.shape[1], k.shape[0]
        logits = torch.einsum("thd,hsd->hts", q[rows].float(), k.float().repeat_interleave(Hq // H, 0)) / 8.0
        sees = positions[None, :] <= positions[rows][:, None]
        return logits.masked_fill(~sees, float("-inf")).softmax(-1), sees, H

    def rank(q, k, positions):
        T = len(q)
        if method == "zipcache":
            rows = probe_queries(T, 0.05, 0.05, rank.layer, positions)
            p, sees, H = probs(q, k, positions, rows)
            score = p.sum(1) / sees.sum(0).clamp(min=1)
            return score.view(H, -1, T).mean(1)
        if method == "mikv":
            p, _, H = probs(q, k, positions, torch.arange(T))
            return p.sum(1).view(H, -1, T).mean(1)
        p, _, H = probs(q, k, positions, torch.arange(T - 5, T))
        return p.amax(1).view(H, -1, T).amax(1)
    return rank


class Layered:
    """Tells plain_rank the layer (zipcache's probe draw hashes it)."""

    def __init__(self, dense, rank):
        self.dense, self.rank = dense, rank

    def __call__(self, layer, *args):
        self.rank.layer = layer
        self.dense.positions = self.positions
        return self.dense(layer, *args)


@pytest.mark.slow
@pytest.mark.parametrize("method,length,blocks", [("zipcache", 270, 3), ("mikv", 230, 2), ("qaq", 230, 2)])
def test_engine_matches_a_plain_statement_of_the_method(smollm2_gguf, method, length, blocks):
    """Greedy tokens through the engine (ranking at prefill, blocks encoded in settle, the twin's
    decode attention) and through DenseRanked: whole blocks at prefill, then one of the prompt's
    last tokens and decode tokens flushed at decode (270 = 2 x 100 + 70: 30 steps to zipcache's
    third block; 230 = 128 + 102: 26 steps to the others' second)."""
    from nanokv import LLM, SamplingParams

    prompt, steps = [(i * 37) % 5000 + 100 for i in range(length)], 36
    llm = LLM(str(smollm2_gguf), dtype="float32", method=method)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    rank = plain_rank(method)
    tokens = restated_greedy(llm.model, Layered(DenseRanked(method, rank), rank), prompt, steps)
    assert out.token_ids == tokens
    R = PLAIN[method][0]
    held = out.metrics["kv_cache_tokens"]
    codec = llm.cache.spec
    assert held // R == blocks and out.metrics["kv_cache_tokens"] == length + steps - 1
    # every cached token once: in a block (its fields) or in the residual (K, V float32 and its
    # position, as the theory counts a residual token)
    assert out.metrics["kv_cache_bytes_theory"] == 30 * 3 * (
        held // R * codec.quantized_bytes(64) + held % R * (2 * 64 * 4 + 4))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PLAIN))
def test_eviction_then_ranked_quantization(smollm2_gguf, method):
    """snapkv+<method>: snapkv's tokens, each in fewer bytes than snapkv alone stores them."""
    from nanokv import LLM, SamplingParams

    prompt, held = [(i * 53) % 5000 + 100 for i in range(300)], {}
    for spec in ("snapkv", f"snapkv+{method}"):
        llm = LLM(str(smollm2_gguf), dtype="float32", method=spec, compression=0.5, window_size=8)
        finish = llm.scheduler.finish

        def capture(seq, llm=llm, finish=finish, spec=spec):
            s = llm.cache.seqs[seq.id]
            cold = llm.cache.quantized_lengths(seq.id) if "+" in spec else 0
            held[spec] = (s.lengths + cold,)
            finish(seq)

        llm.scheduler.finish = capture
        [out] = llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        held[spec] += (out.metrics["kv_cache_bytes"],)
    tokens, full_bytes = held["snapkv"]
    quant_tokens, quant_bytes = held[f"snapkv+{method}"]
    assert torch.equal(tokens, quant_tokens) and (tokens == 150).all()
    assert quant_bytes < full_bytes / 2
