"""Issue 28, calibrated quantizers: kvtuner (a KIVI bit pair per layer, searched offline) and
wkvquant (static channel smoothing + clipped token-wise quantization). Hand-built codec cases,
the search on hand-built sensitivities, bytes as stored, the engine against a plain restatement,
the calibration command end to end on a tiny random model, snapkv+<method>, and bad options."""

import json
import re

import pytest
import torch

from helpers import restated_greedy
from nanokv.kernels.reference import attention_by_position
from test_quant_cache import fake_quant


@pytest.fixture(scope="module")
def tiny_dir(tiny_gqa_dir):
    return tiny_gqa_dir


def prompt(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- kvtuner: the codec ------------------------------------------------------------------------

def test_kvtuner_codec_stores_each_layers_own_bits():
    from nanokv.methods.kvtuner import KVTunerCodec

    codec = KVTunerCodec([(8, 4), (2, 2)], group_size=32, block_size=32)
    # every key channel takes 0..3 over the block's tokens and every value group 0..3 over its
    # channels: a grid of scale 1 from 0, so 2 bits read every number back exactly
    t, c = torch.arange(32)[:, None], torch.arange(32)[None, :]
    k = ((t + c) % 4).float()[None].half()
    v = ((t * 3 + c) % 4).float()[None].half()
    fields = codec.encode(k, v, 1, None)
    assert fields["k_codes"].shape == (1, 32, 32) and fields["v_codes"].shape == (1, 32, 16)   # K8 / V4 wide
    # 2-bit codes, the first in the lowest bits: token 0's channels 0..3 hold 0, 1, 2, 3
    assert int(fields["k_codes"][0, 0, 0]) == 0 | 1 << 2 | 2 << 4 | 3 << 6
    assert fields["k_codes"][0, :, 8:].count_nonzero() == 0 and fields["v_codes"][0, :, 8:].count_nonzero() == 0
    assert fields["k_scale"].shape == (1, 1, 32) and bool((fields["k_scale"] == 1).all())
    keys, values = codec.decode(fields, 1)
    assert torch.equal(keys, k.float()) and torch.equal(values, v.float())
    # layer 0 (K8V4) on a ramp: keys to within half a step of 255 levels, values of 15
    ramp = torch.linspace(-1, 1, 32)
    k, v = (ramp[:, None] * torch.ones(32)).half()[None], (torch.ones(32, 1) * ramp).half()[None]
    keys, values = codec.decode(codec.encode(k, v, 0, None), 0)
    assert (keys - k.float()).abs().max() <= 2 / 255 / 2 + 1e-3 and (values - v.float()).abs().max() <= 2 / 15 / 2 + 1e-3
    assert (keys - k.float()).abs().max() < (values - v.float()).abs().max()


def test_kvtuner_bytes_per_layer_are_those_of_its_bits():
    from nanokv.methods.kvtuner import KVTunerCodec

    codec = KVTunerCodec([(8, 4), (2, 2)], group_size=32, block_size=32)
    # D=64, R=32: codes R*D*bits/8; key scale + zero 1 x 64, value scale + zero 32 x 2, float16
    scales = 2 * 2 * 64 + 2 * 2 * 64
    assert codec.quantized_bytes(64, 0) == 32 * 64 + 32 * 32 + scales == 3584
    assert codec.quantized_bytes(64, 1) == 32 * 16 + 32 * 16 + scales == 1536
    assert codec.quantized_bytes(64) == 3584        # the largest layout: what a pool row holds
    # per token at D=64: 112 bytes (K8V4) and 48 (K2V2) against 256 in float16
    assert codec.quantized_bytes(64, 0) / 32 == 112 and codec.quantized_bytes(64, 1) / 32 == 48


# --- kvtuner: clustering and search -------------------------------------------------------------

SENSITIVE = [0.001, 0.01, 0.02, 0.5, 1.0]          # K8V8, K8V4, K4V4, K4V2, K2V2
ROBUST = [1e-5, 1e-4, 2e-4, 5e-3, 1e-2]


def test_kvtuner_search_on_hand_built_sensitivities():
    from nanokv.methods.kvtuner import PAIRS, cluster_layers, search_pairs

    errors = torch.tensor([SENSITIVE, ROBUST, SENSITIVE, ROBUST])
    labels = cluster_layers(errors, 2)
    assert labels == [0, 1, 0, 1]
    # target 3 bits: the two clusters' pair sums (K + V) add to at most 12. K4V4 + K2V2 costs
    # 2 x 0.02 + 2 x 0.01 = 0.06; K4V2 + K4V2 1.01; K2V2 + K4V4 2.0004
    assert [PAIRS[p] for p in search_pairs(errors, labels, 3.0)] == [(4, 4), (2, 2)] * 2
    # target 4: at most 16. K8V4 + K2V2 = 0.04 beats K4V4 + K4V4 = 0.0404
    assert [PAIRS[p] for p in search_pairs(errors, labels, 4.0)] == [(8, 4), (2, 2)] * 2
    assert [PAIRS[p] for p in search_pairs(errors, labels, 2.0)] == [(2, 2)] * 4
    assert [PAIRS[p] for p in search_pairs(errors, labels, 8.0)] == [(8, 8)] * 4
    # one cluster: every layer the same pair, the best under the target (4: K4V4)
    assert [PAIRS[p] for p in search_pairs(errors, cluster_layers(errors, 1), 4.0)] == [(4, 4)] * 4


# --- kvtuner: the engine --------------------------------------------------------------------------

def kvtuner_artifact(path, model, layers, kv_heads, rows):
    from nanokv.artifacts import model_key
    from nanokv.methods.kvtuner import PAIRS

    path.write_text(json.dumps({"format": 1, "method": "kvtuner", "model": model_key(model), "num_layers": layers,
                                "num_kv_heads": kv_heads, "pairs": [list(p) for p in PAIRS],
                                "layer_errors": rows, "settings": {}}))
    return path


class PerLayerKIVI:
    """A plain statement of KIVI with (K bits, V bits) per layer, as the model's attention callable:
    prefill attends in full precision, then every whole `residual` tokens are quantized (keys per
    channel over `group` tokens, values per token over `group` channels); decode attends over both."""

    def __init__(self, pairs, group, residual):
        self.pairs, self.group, self.residual, self.layers = pairs, group, residual, {}

    def __call__(self, layer, q, k, v, sliding_window):
        kq, vq, kf, vf = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0]))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        keys, values = torch.cat([kq, kf]), torch.cat([vq, vf])
        out = attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))
        cut = len(kf) // self.residual * self.residual
        if cut:
            kb, vb = self.pairs[layer]
            kq = torch.cat([kq, *(fake_quant(kf[s:s + self.residual], kb, self.group, 0) for s in range(0, cut, self.residual))])
            vq = torch.cat([vq, fake_quant(vf[:cut], vb, self.group, 2)])
            kf, vf = kf[cut:], vf[cut:]
        self.layers[layer] = (kq, vq, kf, vf)
        return out


def test_kvtuner_engine_matches_a_plain_restatement_and_its_bytes(tiny_dir, tmp_path):
    from nanokv import LLM, SamplingParams

    artifact = kvtuner_artifact(tmp_path / "kvtuner.json", str(tiny_dir), 2, 2, [SENSITIVE, ROBUST])
    llm = LLM(str(tiny_dir), dtype="float32", method="kvtuner", clusters=2, calibration_file=str(artifact))
    assert llm.method.bit_pairs == [(8, 4), (2, 2)]                # target 4 (the default), as searched by hand
    ids, steps = prompt(100), 40                                   # flushes at prefill and during decode
    [out] = llm.generate([ids], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert out.token_ids == restated_greedy(llm.model, PerLayerKIVI([(8, 4), (2, 2)], 32, 32), ids, steps)
    # bytes as stored: per layer and head, whole blocks at that layer's bits, the rest in float32
    held = 100 + steps - 1
    per_layer = [32 * 32 + 32 * 16 + 4 * 32 + 4 * 32, 32 * 8 + 32 * 8 + 4 * 32 + 4 * 32]   # D = 32
    residual = (2 * 32 * 4 + 4) * (held % 32)
    assert out.metrics["kv_cache_bytes_theory"] == 2 * sum(held // 32 * b + residual for b in per_layer)
    assert out.metrics["kv_cache_bytes"] < out.metrics["kv_cache_bytes_uncompressed"] / 2


def test_snapkv_then_kvtuner_keeps_snapkvs_tokens_in_fewer_bytes(tiny_dir, tmp_path):
    from helpers import generate_holding
    from nanokv import LLM, SamplingParams

    artifact = kvtuner_artifact(tmp_path / "kvtuner.json", str(tiny_dir), 2, 2, [SENSITIVE, ROBUST])
    ids = prompt(200, seed=3)
    snap = LLM(str(tiny_dir), dtype="float32", method="snapkv", compression=0.5, window_size=8)
    both = LLM(str(tiny_dir), dtype="float32", method="snapkv+kvtuner", compression=0.5, window_size=8,
               clusters=2, target=3.0, calibration_file=str(artifact))
    assert both.method.quantization.pairs == [(4, 4), (2, 2)]
    _, held_snap = generate_holding(snap, ids, 1)
    [a] = snap.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    [b] = both.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    assert all(len(h) == 100 for h in held_snap)                     # snapkv keeps 100 of 200 a head
    assert b.metrics["kv_cache_tokens"] == a.metrics["kv_cache_tokens"]
    assert b.metrics["kv_cache_bytes_theory"] < a.metrics["kv_cache_bytes_theory"] / 3


def test_kvtuner_bad_options_and_missing_calibration(tiny_dir, tmp_path, monkeypatch):
    from nanokv import LLM
    from nanokv.methods import make_method

    with pytest.raises(ValueError, match=r"option target=9\.0 of method 'kvtuner' must be the average bits per K/V "
                                         r"number, in \[2, 8\]"):
        make_method("kvtuner", target=9)
    with pytest.raises(ValueError, match=r"option clusters=0 .* 1 to 6"):
        make_method("kvtuner", clusters=0)
    with pytest.raises(ValueError, match="residual_length=48 .* multiple of group_size=32"):
        make_method("kvtuner", residual_length=48)
    with pytest.raises(ValueError, match="each need a calibration"):
        make_method("headkv+kvtuner", compression=0.5)
    with pytest.raises(ValueError, match="does not compress"):
        make_method("kvtuner", compression=0.5)
    with pytest.raises(ValueError, match="needs its calibration"):
        make_method("kvtuner").quantization
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    for name in ("kvtuner", "snapkv+kvtuner"):
        with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate kvtuner --model {tiny_dir}")):
            LLM(str(tiny_dir), dtype="float32", method=name, **({"compression": 0.5} if "+" in name else {}))
    bad = kvtuner_artifact(tmp_path / "bad.json", str(tiny_dir), 2, 2, [SENSITIVE, [0.1, -1, 0, 0, 0]])
    with pytest.raises(ValueError, match="layer_errors is not 2 lists"):
        LLM(str(tiny_dir), dtype="float32", method="kvtuner", calibration_file=str(bad))


def test_kvtuner_calibration_restated_and_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys):
    """The command's errors against a plain restatement (fake_quant of each layer's K/V, attention
    over them) and the artifact LLM then reads from the cache."""
    from nanokv import LLM
    from nanokv.calibrate import cli, model_key
    from nanokv.calibrate.dense import calibration_texts
    from nanokv.loading import load_model
    from nanokv.methods.kvtuner import PAIRS
    from nanokv.tokenizer import Tokenizer

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    assert cli.main(["kvtuner", "--model", str(tiny_dir), "--samples", "2", "--length", "96", "--device", "cpu"]) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / "kvtuner.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    artifact = json.loads(path.read_text())
    errors = torch.tensor(artifact["layer_errors"])
    assert errors.shape == (2, 5) and artifact["pairs"] == [list(p) for p in PAIRS]
    # restated: per layer, the exact run's q, k, v; 96 tokens = 3 blocks of 32
    model, config = load_model("hf_dir", tiny_dir, torch.float32, pack=False)
    texts = calibration_texts(Tokenizer.from_dir(tiny_dir), 2, 96, 0)
    seen = {}

    class Capture:
        positions = torch.arange(96)

        def __call__(self, layer, q, k, v, sliding_window):
            seen.setdefault(layer, []).append((q, k, v))
            return attention_by_position(q, k, v, self.positions, self.positions)

    with torch.inference_mode():
        for ids in texts:
            model(torch.tensor(ids), torch.arange(96), Capture())
    want = torch.zeros(2, 5, dtype=torch.float64)
    for layer in range(2):
        err = norm = 0
        for q, k, v in seen[layer]:
            pos = torch.arange(96)
            exact = attention_by_position(q, k, v, pos, pos).double()
            norm += exact.square().sum()
            for p, (kb, vb) in enumerate(PAIRS):
                kq = torch.cat([fake_quant(k[s:s + 32], kb, 32, 0) for s in range(0, 96, 32)])
                approx = attention_by_position(q, kq, fake_quant(v, vb, 32, 2), pos, pos).double()
                want[layer, p] += (approx - exact).square().sum()
        want[layer] /= norm
    assert torch.allclose(errors.double(), want.float().double(), rtol=1e-4, atol=1e-9)
    assert bool((errors[:, 0] < errors[:, 4]).all())               # K8V8 hurts less than K2V2
    llm = LLM(str(tiny_dir), dtype="float32", method="kvtuner", target=3.0)
    assert len(llm.method.bit_pairs) == 2
    assert sum(k + v for k, v in llm.method.bit_pairs) / 4 <= 3.0


# --- wkvquant ----------------------------------------------------------------------------------

def restated_wkv(x, center, scale, clip, bits):
    """x [..., D] read back through WKVQuant's two-dimensional quantization, written out apart from
    nanokv: smoothed per channel, one clipped asymmetric grid per token (float16 scale and zero)."""
    y = (x.float() - center) / scale
    low = (y.amin(-1, keepdim=True) * clip).half().float()
    step = ((y.amax(-1, keepdim=True) * clip - low) / (2 ** bits - 1)).half().float()
    codes = torch.where(step > 0, ((y - low) / torch.where(step > 0, step, 1)).round(), 0).clamp(0, 2 ** bits - 1)
    return (codes * step + low) * scale + center


def wkv_codec(bits=2, D=32, layers=2, center=0.0, scale=1.0, clip=1.0):
    from nanokv.methods.wkvquant import WKVQuantCodec

    c = torch.full((layers, D), center) if isinstance(center, float) else center
    s = torch.full((layers, D), scale) if isinstance(scale, float) else scale
    g = torch.full((layers,), clip)
    return WKVQuantCodec(bits, 32, c, s, g, c.clone(), s.clone(), g.clone())


def test_wkvquant_codec_by_hand():
    # a token whose numbers are 0..3: a grid of step 1 from 0 at 2 bits, read back exactly
    row = (torch.arange(32) % 4).float()
    k = row.expand(32, 32)[None].half()
    codec = wkv_codec()
    fields = codec.encode(k, k, 0, None)
    assert fields["k_codes"].shape == (1, 32, 8) and int(fields["k_codes"][0, 0, 0]) == 0 | 1 << 2 | 2 << 4 | 3 << 6
    assert fields["k_scale"].shape == (1, 32, 1) and bool((fields["k_scale"] == 1).all())
    keys, values = codec.decode(fields, 0)
    assert torch.equal(keys, k.float()) and torch.equal(values, k.float())
    # clipping to half the range: -4, 4, 0 on the grid -2 + j 4/3 read back as -2, 2 and 2/3
    x = torch.zeros(1, 32, 32)
    x[..., 0], x[..., 1] = -4, 4
    keys, _ = wkv_codec(clip=0.5).decode(wkv_codec(clip=0.5).encode(x.half(), x.half(), 1, None), 1)
    assert torch.allclose(keys[0, 0, :3], torch.tensor([-2.0, 2.0, 2 / 3]), atol=2e-3)
    # smoothing: channels 0..15 spread 4x wider than the grid, 16..31 4x narrower, centred at 10;
    # (x - 10) / s is back on 0..3 and reads back exactly, while plain token-wise codes do not
    s = torch.cat([torch.full((16,), 4.0), torch.full((16,), 0.25)]).expand(2, 32)
    x = (row * s[0] + 10)[None, None].expand(1, 32, 32).half()
    smooth = wkv_codec(center=torch.full((2, 32), 10.0), scale=s.clone())
    assert torch.equal(smooth.decode(smooth.encode(x, x, 0, None), 0)[0], x.float())
    plain = wkv_codec()
    assert (plain.decode(plain.encode(x, x, 0, None), 0)[0] - x.float()).abs().max() > 0.5


def test_wkvquant_smoothing_scale_and_bytes():
    from nanokv.methods.wkvquant import smoothing_scale

    # radius^0.5 = 1, 2, 4 over their geometric mean 2
    assert torch.allclose(smoothing_scale(torch.tensor([1.0, 4.0, 16.0]), 0.5), torch.tensor([0.5, 1.0, 2.0]))
    assert torch.equal(smoothing_scale(torch.tensor([1.0, 4.0, 16.0]), 0.0), torch.ones(3))
    # D=64, 32 tokens: codes 32 x 64 x bits / 8 for K and V, a float16 scale and zero per token each
    for bits, per_token in ((4, 72), (2, 40), (8, 136)):
        codec = wkv_codec(bits, D=64)
        assert codec.quantized_bytes(64) == 32 * per_token == 2 * 32 * 64 * bits // 8 + 4 * 32 * 2
    assert 72 / 256 < 0.3                                             # 4 bits: 72 of float16's 256 bytes


def wkv_artifact(path, model, layers, D, gen):
    from nanokv.artifacts import model_key

    fields = {f"{kind}_{stat}": (torch.randn(layers, D, generator=gen) * (0.5 if stat == "center" else 1)).abs().tolist()
              for kind in "kv" for stat in ("center", "radius")}
    search = {bits: {"k_alpha": [0.5, 1.0], "k_clip": [0.9, 1.0], "v_alpha": [0.25, 0.0], "v_clip": [1.0, 0.8]}
              for bits in ("2", "4", "8")}
    path.write_text(json.dumps({"format": 1, "method": "wkvquant", "model": model_key(model), "num_layers": layers,
                                "num_kv_heads": 2, "head_dim": D, **fields, "search": search, "settings": {}}))
    return path, fields, search


class PlainWKV:
    """WKVQuant's cache restated as the model's attention callable: prefill in full precision, then
    every whole `residual` tokens read back through restated_wkv; decode attends over both."""

    def __init__(self, params, bits, residual):
        self.params, self.bits, self.residual, self.layers = params, bits, residual, {}

    def __call__(self, layer, q, k, v, sliding_window):
        kq, vq, kf, vf = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0]))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        keys, values = torch.cat([kq, kf]), torch.cat([vq, vf])
        out = attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))
        cut = len(kf) // self.residual * self.residual
        if cut:
            kq = torch.cat([kq, restated_wkv(kf[:cut], *self.params("k", layer), self.bits)])
            vq = torch.cat([vq, restated_wkv(vf[:cut], *self.params("v", layer), self.bits)])
            kf, vf = kf[cut:], vf[cut:]
        self.layers[layer] = (kq, vq, kf, vf)
        return out


@pytest.mark.parametrize("bits", [4, 2])
def test_wkvquant_engine_matches_a_plain_restatement_and_its_bytes(tiny_dir, tmp_path, bits):
    from nanokv import LLM, SamplingParams

    path, fields, search = wkv_artifact(tmp_path / "wkv.json", str(tiny_dir), 2, 32, torch.Generator().manual_seed(5))

    def params(kind, layer):
        radius = torch.tensor(fields[f"{kind}_radius"][layer]).clamp_min(1e-6)
        alpha = search[str(bits)][f"{kind}_alpha"][layer]
        scale = radius ** alpha / torch.exp((alpha * radius.log()).mean())
        return torch.tensor(fields[f"{kind}_center"][layer]), scale, search[str(bits)][f"{kind}_clip"][layer]

    llm = LLM(str(tiny_dir), dtype="float32", method="wkvquant", bits=bits, calibration_file=str(path))
    ids, steps = prompt(90, seed=7), 30
    [out] = llm.generate([ids], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert out.token_ids == restated_greedy(llm.model, PlainWKV(params, bits, 32), ids, steps)
    held = 90 + steps - 1
    per_block = 2 * 32 * 32 * bits // 8 + 4 * 32 * 2
    assert out.metrics["kv_cache_bytes_theory"] == 2 * 2 * (held // 32 * per_block + held % 32 * (2 * 32 * 4 + 4))


def test_snapkv_then_wkvquant_and_bad_options(tiny_dir, tmp_path, monkeypatch):
    from nanokv import LLM, SamplingParams
    from nanokv.methods import make_method

    path, _, _ = wkv_artifact(tmp_path / "wkv.json", str(tiny_dir), 2, 32, torch.Generator().manual_seed(5))
    ids = prompt(200, seed=3)
    snap = LLM(str(tiny_dir), dtype="float32", method="snapkv", compression=0.5, window_size=8)
    both = LLM(str(tiny_dir), dtype="float32", method="snapkv+wkvquant", compression=0.5, window_size=8,
               calibration_file=str(path))
    [a] = snap.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    [b] = both.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    assert b.metrics["kv_cache_tokens"] == a.metrics["kv_cache_tokens"]
    assert b.metrics["kv_cache_bytes_theory"] < a.metrics["kv_cache_bytes_theory"] / 3
    with pytest.raises(ValueError, match=r"option bits=3 of method 'wkvquant' must be 2, 4 or 8"):
        make_method("wkvquant", bits=3)
    with pytest.raises(ValueError, match=r"option residual_length=20 .* a power of two from 16 to 128"):
        make_method("wkvquant", residual_length=20)
    with pytest.raises(ValueError, match="needs its calibration"):
        make_method("wkvquant").quantization
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate wkvquant --model {tiny_dir}")):
        LLM(str(tiny_dir), dtype="float32", method="wkvquant")
    broken = json.loads(path.read_text())
    del broken["search"]["2"]["v_clip"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"search\['2'\] does not hold"):
        LLM(str(tiny_dir), dtype="float32", method="wkvquant", calibration_file=str(tmp_path / "broken.json"))


def test_wkvquant_calibration_restated(tiny_dir, tmp_path, monkeypatch, capsys):
    """The command's centres, radii and searched alpha / clip against a plain restatement over the
    same dense pass, and the artifact LLM then reads from the cache."""
    from nanokv import LLM
    from nanokv.calibrate import cli, model_key
    from nanokv.calibrate.dense import calibration_texts
    from nanokv.loading import load_model
    from nanokv.methods.wkvquant import ALPHAS, CLIPS
    from nanokv.tokenizer import Tokenizer

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    assert cli.main(["wkvquant", "--model", str(tiny_dir), "--samples", "2", "--length", "80", "--device", "cpu"]) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / "wkvquant.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    artifact = json.loads(path.read_text())
    model, _ = load_model("hf_dir", tiny_dir, torch.float32, pack=False)
    seen = {}

    class Capture:
        positions = torch.arange(80)

        def __call__(self, layer, q, k, v, sliding_window):
            seen.setdefault(layer, []).append((q, k, v))
            return attention_by_position(q, k, v, self.positions, self.positions)

    with torch.inference_mode():
        for ids in calibration_texts(Tokenizer.from_dir(tiny_dir), 2, 80, 0):
            model(torch.tensor(ids), torch.arange(80), Capture())
    layer, bits = 1, 2
    for i, kind in enumerate("kv"):
        xs = torch.cat([s[1 + i].reshape(-1, 32) for s in seen[layer]])
        center, radius = (xs.amax(0) + xs.amin(0)) / 2, (xs.amax(0) - xs.amin(0)) / 2
        assert (torch.tensor(artifact[f"{kind}_center"][layer]) - center).abs().max() < 1e-5, (torch.tensor(artifact[f"{kind}_center"][layer]) - center).abs().max()
        assert torch.allclose(torch.tensor(artifact[f"{kind}_radius"][layer]), radius, atol=1e-6)

        def error(alpha, clip):  # every query of the 80 (the command matches the last 64 of each)
            log = radius.clamp_min(1e-6).log() * alpha
            scale = (log - log.mean()).exp()
            total = 0.0
            for q, k, v in seen[layer]:
                pos = torch.arange(80)
                exact = attention_by_position(q[-64:], k, v, pos[-64:], pos)
                kk, vv = (restated_wkv(k, center, scale, clip, bits), v) if kind == "k" else \
                    (k, restated_wkv(v, center, scale, clip, bits))
                total += float((attention_by_position(q[-64:], kk, vv, pos[-64:], pos) - exact).double().square().sum())
            return total

        alpha = min(ALPHAS, key=lambda a: error(a, 1.0))
        clip = min(CLIPS, key=lambda c: error(alpha, c))
        assert (artifact["search"][str(bits)][f"{kind}_alpha"][layer], artifact["search"][str(bits)][f"{kind}_clip"][layer]) \
            == (alpha, clip)
        assert error(alpha, clip) <= error(0.0, 1.0)
    llm = LLM(str(tiny_dir), dtype="float32", method="wkvquant", bits=2)
    assert llm.method.smoothing["k_clip"].shape == (2,)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kvtuner", "wkvquant"])
def test_calibrated_on_real_weights_matches_the_restatement(smollm2_gguf, tmp_path, method):
    """SmolLM2 calibrated with tiny settings, then the engine's greedy tokens against the plain
    restatement of the runtime with the parameters the method bound."""
    from nanokv import LLM, SamplingParams
    from nanokv.calibrate.cli import calibrate

    path = calibrate(method, str(smollm2_gguf), samples=1, length=128, out=tmp_path / f"{method}.json",
                     device="cpu", quiet=True)
    options = {"target": 3.5} if method == "kvtuner" else {"bits": 4}
    llm = LLM(str(smollm2_gguf), dtype="float32", method=method, calibration_file=str(path), **options)
    if method == "kvtuner":
        pairs = llm.method.bit_pairs
        assert len(pairs) == 30 and sum(k + v for k, v in pairs) / 60 <= 3.5
        reference = PerLayerKIVI(pairs, 32, 32)
    else:
        s = llm.method.smoothing
        reference = PlainWKV(lambda kind, layer: (s[f"{kind}_center"][layer], s[f"{kind}_scale"][layer],
                                                  float(s[f"{kind}_clip"][layer])), 4, 32)
    ids, steps = list(range(1000, 1150)), 30
    [out] = llm.generate([ids], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert out.token_ids == restated_greedy(llm.model, reference, ids, steps)
