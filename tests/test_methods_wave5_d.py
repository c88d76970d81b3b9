"""kvquant and skvq (issue 28): calibrated quantizers on the tiered cache.

Hand-built blocks whose stored and decoded values are worked out by hand, a plain restatement of
each codec (compared to its decode, and on real weights to the engine's greedy tokens), the bytes
as stored, snapkv+<method>, bad options, and `python -m nanokv.calibrate kvquant|skvq` end to end
on a tiny random model."""

import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.kvquant import KVQuantCodec
from nanokv.methods.skvq import SKVQCodec

FP8 = torch.float8_e4m3fn


# --- plain restatements (no nanokv code) ----------------------------------------------------

def rope(x, pos, inv_freq, sign):
    """x [R, D] rotated by sign * angle (rotate-half pairs i, i + D/2)."""
    half = x.shape[-1] // 2
    angle = pos.double()[:, None] * inv_freq.double()[None]
    cos, sin = angle.cos(), angle.sin()
    a, b = x[:, :half].double(), x[:, half:].double()
    return torch.cat([a * cos - sign * b * sin, b * cos + sign * a * sin], -1).float()


def sink_first(pos, sinks):
    return sorted(range(len(pos)), key=lambda i: (int(pos[i]) >= sinks, i))


def restated_kvquant_block(k, v, pos, k_book, v_book, inv_freq, room):
    """One block [R, D] as KVQuant stores it, read back: rows sink-first (the token at position 0
    kept in float16), keys before RoPE per channel and values per token: the `room` entries of
    largest |x - mean| / std (over the non-sink rows) kept in float16, the rest normalized by
    their centre and half-range (float16) to the nearest codebook level."""
    order = sink_first(pos, 1)
    k, v, pos = k[order], v[order], pos[order]
    sink = pos == 0
    out = []
    for x, book, per_channel in ((rope(k, pos, inv_freq, -1), k_book, True), (v.float(), v_book, False)):
        y = x.T if per_channel else x                           # rows: one vector each
        keep = sink[None, :].expand_as(y) if per_channel else sink[:, None].expand_as(y)
        keep = ~keep
        rec = torch.zeros_like(y)
        z = torch.zeros_like(y)
        for i in range(len(y)):
            vals = y[i][keep[i]]
            if len(vals):
                mean, std = vals.mean(), ((vals - vals.mean()) ** 2).mean().sqrt()
                z[i] = torch.where(keep[i], (y[i] - mean).abs() / max(float(std), 1e-6), 0.0)
        outlier = torch.zeros(y.numel(), dtype=torch.bool)
        outlier[z.flatten().topk(room).indices] = True
        outlier = outlier.view_as(y)
        for i in range(len(y)):
            dense = keep[i] & ~outlier[i]
            hi, lo = (y[i][dense].max(), y[i][dense].min()) if dense.any() else (torch.tensor(0.), torch.tensor(0.))
            centre, half = ((hi + lo) / 2).half().float(), ((hi - lo) / 2).half().float()
            n = ((y[i] - centre) / (half if half > 0 else 1.0)).clamp(-1, 1)
            rec[i] = book[(n[:, None] - book[None]).abs().argmin(1)] * half + centre
        rec = torch.where(outlier, y.half().float(), rec)
        out.append(rec.T if per_channel else rec)
    k_hat = rope(out[0], pos, inv_freq, 1)
    k_hat[sink], out[1][sink] = k[sink].half().float(), v[sink].half().float()
    return k_hat, out[1]


def fp8(x):
    return x.clamp(-448, 448).to(FP8).float()


def restated_skvq_block(k, v, pos, k_clusters, v_clusters, k_clip, v_clip, bits, inv_freq, sinks):
    """One block [R, D] as SKVQ stores it, read back: rows sink-first (tokens at positions < sinks
    kept in float16), keys before RoPE and values per token and channel cluster: min and max
    times the clip ratio, zero = min and scale = (max - min) / (2^bits - 1) in FP8, codes rounded."""
    order = sink_first(pos, sinks)
    k, v, pos = k[order], v[order], pos[order]
    out = []
    for x, clusters, clip in ((rope(k, pos, inv_freq, -1), k_clusters, k_clip), (v.float(), v_clusters, v_clip)):
        rec = torch.zeros_like(x)
        for t in range(len(x)):
            for c in clusters.unique().tolist():
                ch = clusters == c
                lo, hi = x[t, ch].min() * clip, x[t, ch].max() * clip
                zero, scale = fp8(lo), fp8((hi - lo) / (2 ** bits - 1))
                codes = ((x[t, ch] - zero) / (scale if scale > 0 else 1.0)).round().clamp(0, 2 ** bits - 1)
                rec[t, ch] = codes * scale + zero
        out.append(rec)
    k_hat, v_hat = rope(out[0], pos, inv_freq, 1), out[1]
    sink = pos < sinks
    k_hat[sink], v_hat[sink] = k[sink].half().float(), v[sink].half().float()
    return k_hat, v_hat


def roundtrip(codec, k, v, layer, pos, heads, D):
    """The codec's fields, cast to their stored dtypes, decoded."""
    shapes = codec.field_shapes(D)
    fields = codec.encode(k, v, layer, None, positions=pos, heads=heads)
    assert set(fields) == set(shapes)
    stored = {n: x.to(shapes[n][0]) for n, x in fields.items()}
    for n, x in stored.items():
        assert tuple(x.shape[1:]) == shapes[n][1], n
    return codec.decode(stored, layer), stored


INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))   # head_dim 8


# --- kvquant: hand-built ----------------------------------------------------------------------

def test_kvquant_block_on_its_grid_reads_back_exactly_with_its_outliers_and_sink():
    """Pre-RoPE keys whose every channel spans centre +- half with values on the codebook's levels,
    values likewise per token: every dense entry is exact; the two planted key outliers (room:
    ceil(1% of 16 x 8) = 2) and the sink (position 0, at row 3) come back as stored in float16."""
    R, D = 16, 8
    book = torch.tensor([-1.0, -0.25, 0.5, 1.0])
    gen = torch.Generator().manual_seed(0)
    levels = book[torch.randint(0, 4, (R, D), generator=gen)]
    levels[1], levels[2] = -1.0, 1.0                       # rows 1, 2: each channel's min and max
    centre, half = torch.arange(D) * 0.5 - 2, torch.full((D,), 2.0)
    pre = levels * half + centre
    pos = torch.tensor([5, 6, 7, 0, *range(8, 20)])        # the sink at row 3
    pre[3] = 37.0                                          # the sink: far out, yet kept whole
    pre[6, 4], pre[9, 1] = 100.0, -80.0                    # the block's two outliers
    vlev = book[torch.randint(0, 4, (R, D), generator=gen)]
    vlev[:, 0], vlev[:, 1] = -1.0, 1.0                     # each token's min and max
    vlev[:, 2], vlev[:, 3] = -1.0, 1.0                     # twice: a value outlier taken out leaves them
    v = vlev * 0.5 + torch.arange(R)[:, None] * 0.25
    k = rope(pre, pos, INV_FREQ, 1)                        # as cached: after RoPE
    books = torch.stack([book, book])
    codec = KVQuantCodec(2, books, books, INV_FREQ, outliers=0.01, block_size=R)
    (k_hat, v_hat), stored = roundtrip(codec, k[None], v[None], 1, pos[None].int(), torch.tensor([0]), D)
    order = [3, 0, 1, 2, *range(4, R)]                     # sink-first
    assert stored["pos"][0].tolist() == pos[order].tolist() and stored["sink_rows"].item() == 1
    assert torch.allclose(k_hat[0], k[order], atol=1e-4) and torch.allclose(v_hat[0], v[order], atol=1e-6)
    # stored as worked out: centre and half-range per key channel, the outliers' flat indices (rows 6
    # and 9 of the sink-first block, channels 4 and 1) and values, 2-bit codes of the levels
    assert torch.equal(stored["k_centre"][0].float(), centre) and torch.equal(stored["k_half"][0].float(), half)
    found = sorted(zip(stored["k_out_index"][0].tolist(), stored["k_out_value"][0].tolist()))
    assert found == [(6 * D + 4, 100.0), (9 * D + 1, -80.0)]
    codes = torch.stack([(stored["k_codes"][0] >> s) & 3 for s in (0, 2, 4, 6)], -1).flatten(1)
    expected = (levels[order][:, :, None] == book).float().argmax(-1)
    dense = torch.ones(R, D, dtype=torch.bool)
    dense[0], dense[6, 4], dense[9, 1] = False, False, False  # the sink's and the outliers' codes are unused
    assert torch.equal(codes.long()[dense], expected[dense])


def test_kvquant_matches_a_plain_restatement():
    R, D, N = 16, 8, 3
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(N, R, D, generator=gen) * torch.tensor([0.3, 4, 1, 1, 0.5, 2, 1, 1])
    v = torch.randn(N, R, D, generator=gen)
    pos = torch.stack([torch.randperm(R, generator=gen), torch.arange(R, 2 * R), torch.arange(40, 40 + R)]).int()
    kb = torch.tensor([[-1.0, -0.4, 0.1, 1.0]] * 2)
    vb = torch.tensor([[-1.0, -0.2, 0.3, 1.0]] * 2)
    codec = KVQuantCodec(2, kb, vb, INV_FREQ, outliers=0.02, block_size=R)
    (k_hat, v_hat), _ = roundtrip(codec, k, v, 0, pos, torch.tensor([0, 1, 0]), D)
    room = math.ceil(0.02 * R * D)
    for b in range(N):
        k_exp, v_exp = restated_kvquant_block(k[b], v[b], pos[b], kb[0], vb[0], INV_FREQ, room)
        assert torch.allclose(k_hat[b], k_exp, atol=1e-4) and torch.allclose(v_hat[b], v_exp, atol=1e-5)


# --- skvq: hand-built ----------------------------------------------------------------------

def test_skvq_token_groups_follow_the_heads_clusters_and_clip():
    """One token of values [-1, 0, 2, 3 | 10, 11, 12, 13 ...]: head 1's clusters put channels
    0-3 in group 0 and 4-7 in group 1; at 2 bits with clip 1: group 0 has zero -1, scale 4/3 ->
    FP8 1.375, codes round((x + 1) / 1.375) = 0, 1, 2, 3; with head 0's clusters (alternating) the
    groups differ, and so do the scales."""
    R, D = 8, 8
    v = torch.zeros(R, D)
    v[4] = torch.tensor([-1.0, 0.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    k = torch.zeros(R, D)
    pos = torch.arange(100, 100 + R).int()                 # no sink in this block
    clusters = torch.stack([torch.arange(D) % 2, torch.arange(D) // 4])[None]   # [L=1, H=2, D]
    codec = SKVQCodec(2, 2, 2, clusters, clusters, torch.tensor([1.0]), torch.tensor([1.0]), INV_FREQ,
                      block_size=R, sinks=1)
    (_, v_hat), stored = roundtrip(codec, k[None], v[None], 0, pos[None], torch.tensor([1]), D)
    assert stored["head"].item() == 1 and stored["sink_rows"].item() == 0
    scale = stored["v_scale"][0, 4].view(FP8).float().tolist()
    zero = stored["v_zero"][0, 4].view(FP8).float().tolist()
    assert zero == [-1.0, 10.0] and scale == [1.375, 1.0]   # 4/3 -> 1.375 in e4m3; 3/3 = 1
    codes = torch.stack([(stored["v_codes"][0, 4] >> s) & 3 for s in (0, 2, 4, 6)], -1).flatten()
    assert codes.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert v_hat[0, 4].tolist() == [-1.0, 0.375, 1.75, 3.125, 10.0, 11.0, 12.0, 13.0]
    # head 0's clusters: groups {-1, 2, 10, 12} and {0, 3, 11, 13}
    (_, v_hat0), stored0 = roundtrip(codec, k[None], v[None], 0, pos[None], torch.tensor([0]), D)
    assert stored0["v_zero"][0, 4].view(FP8).float().tolist() == [-1.0, 0.0]
    # clip 0.5 halves min and max: group 1 of head 1 spans 5..6.5, so 13 clips to code 3 -> 6.5
    clipped = SKVQCodec(2, 2, 2, clusters, clusters, torch.tensor([1.0]), torch.tensor([0.5]), INV_FREQ,
                        block_size=R, sinks=1)
    (_, v_clip), _ = roundtrip(clipped, k[None], v[None], 0, pos[None], torch.tensor([1]), D)
    assert v_clip[0, 4, 7].item() == 6.5


def test_skvq_matches_a_plain_restatement_with_sinks():
    R, D = 16, 8
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(2, R, D, generator=gen) * torch.tensor([0.3, 4, 1, 1, 0.5, 2, 1, 1])
    v = torch.randn(2, R, D, generator=gen)
    pos = torch.stack([torch.randperm(R, generator=gen), torch.arange(R, 2 * R)]).int()
    clusters = torch.stack([torch.tensor([0, 1, 0, 0, 1, 1, 0, 0]), torch.tensor([1, 1, 0, 0, 0, 1, 1, 0])])[None]
    codec = SKVQCodec(2, 4, 2, clusters, clusters.flip(-1), torch.tensor([0.9]), torch.tensor([0.95]), INV_FREQ,
                      block_size=R, sinks=3)
    heads = torch.tensor([1, 0])
    (k_hat, v_hat), stored = roundtrip(codec, k, v, 0, pos, heads, D)
    assert stored["sink_rows"][:, 0].tolist() == [3, 0]
    for b in range(2):
        h = int(heads[b])
        k_exp, _ = restated_skvq_block(k[b], v[b], pos[b], clusters[0, h], clusters.flip(-1)[0, h], 0.9, 0.95, 2,
                                       INV_FREQ, 3)
        _, v_exp = restated_skvq_block(k[b], v[b], pos[b], clusters[0, h], clusters.flip(-1)[0, h], 0.9, 0.95, 4,
                                       INV_FREQ, 3)
        assert torch.allclose(k_hat[b], k_exp, atol=1e-4) and torch.allclose(v_hat[b], v_exp, atol=1e-5)


# --- bytes ----------------------------------------------------------------------------------

def test_bytes_per_block_as_stored():
    """head_dim 64, 128-token blocks. kvquant 2-bit: codes 2 x 128 x 16, key centre/half 2 x 64 x 2,
    value centre/half 2 x 128 x 2, outliers (ceil(0.01 x 8192) = 82 each) 2 x 82 x (2 + 2), positions
    128 x 4, sink 2 x 64 x 2, its flag 1 = 6,289 bytes (49.1 per token; float16 K and V: 256).
    skvq K2V2 group 32: codes 4,096, FP8 scale and zero 4 x 128 x 2, positions 512, head 1, five
    sinks 2 x 5 x 64 x 2, flag 1 = 6,914 (54.0 per token)."""
    books = torch.zeros(1, 4)
    kvq = KVQuantCodec(2, books, books, torch.ones(32))
    assert kvq.quantized_bytes(64) == 4096 + 256 + 512 + 656 + 512 + 256 + 1 == 6289
    clusters = torch.zeros(1, 1, 64, dtype=torch.long)
    sk = SKVQCodec(2, 2, 2, clusters, clusters, torch.ones(1), torch.ones(1), torch.ones(32))
    assert sk.quantized_bytes(64) == 4096 + 1024 + 512 + 1 + 1280 + 1 == 6914
    assert kvq.quantized_bytes(64) / 128 < 256 / 5 and sk.quantized_bytes(64) / 128 < 256 / 4


# --- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, words", [
    ("kvquant", {"bits": 3}, ["bits=3", "2 or 4"]),
    ("kvquant", {"outliers": 0.0}, ["outliers=0.0", "(0, 0.5)"]),
    ("skvq", {"group_size": 48}, ["group_size=48", "16, 32, 64, 128"]),
    ("skvq", {"k_bits": 3}, ["k_bits=3", "2, 4 or 8"]),
    ("skvq", {"sinks": 200, "window": 128}, ["sinks=200"]),
    ("snapkv+kvquant", {"bits": 5, "compression": 0.5}, ["bits=5", "2 or 4"]),
])
def test_bad_options_name_the_value_and_the_choices(name, options, words):
    with pytest.raises(ValueError) as e:
        make_method(name, **options)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_quantizer_alone_takes_no_compression_and_needs_its_calibration():
    with pytest.raises(ValueError, match="does not compress"):
        make_method("kvquant", compression=0.5)
    with pytest.raises(ValueError, match="python -m nanokv.calibrate skvq"):
        make_method("skvq").quantization


# --- calibration and the engine on a tiny random model ---------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tiny_qwen2_gqa_dir):
    return tiny_qwen2_gqa_dir


@pytest.fixture(scope="module")
def artifacts(tiny_dir, tmp_path_factory):
    """python -m nanokv.calibrate kvquant / skvq on the tiny model (2 samples of 256 tokens), written
    with --out (a NANOKV_CACHE of its own would rebuild the C++ kernels, which live there too)."""
    from nanokv.calibrate import cli

    folder = tmp_path_factory.mktemp("w5d-calibration")
    made = {}
    for method in ("kvquant", "skvq"):
        made[method] = folder / f"{method}.safetensors"
        argv = [method, "--model", str(tiny_dir), "--samples", "2", "--length", "256", "--device", "cpu",
                "--out", str(made[method])]
        assert cli.main(argv) == 0 and made[method].is_file()
    return made


def test_kmeans_and_channel_clusters_on_hand_built_points():
    from nanokv.calibrate.kvquant import kmeans_1d
    from nanokv.calibrate.skvq import best_clip, cluster_channels

    x = torch.tensor([-1.0, -0.9, -1.1, 0.0, 0.1, -0.1, 2.0, 2.1, 1.9, 5.0])
    assert torch.allclose(kmeans_1d(x, 3), torch.tensor([-1.0, 0.0, 2.75]), atol=1e-6)
    low = torch.tensor([-1.0, -20.0, -1.1, -0.9, -19.0, -1.0])
    high = torch.tensor([1.0, 21.0, 0.9, 1.1, 20.0, 1.0])
    assert cluster_channels(low, high, 2).tolist() == [0, 1, 0, 0, 1, 0]   # narrow channels first
    # a group of one constant channel and wide noise: clipping cannot help a constant, 1.0 is best there
    const = torch.full((1, 16, 4), 3.0)
    assert best_clip(const, torch.zeros(1, 4, dtype=torch.long), 1, 2) == 1.0


def test_calibrate_writes_artifacts_that_llm_reads(tiny_dir, artifacts):
    from nanokv.artifacts import read_artifact

    kvq = read_artifact(artifacts["kvquant"], "kvquant")
    t = kvq["tensors"]
    assert (kvq["method"], kvq["head_dim"], kvq["settings"]["samples"]) == ("kvquant", 16, 2)
    for bits in (2, 4):
        for kind in "kv":
            book = t[f"{kind}_codebook_{bits}"]
            assert book.shape == (2, 2 ** bits) and bool((book.diff(dim=1) > 0).all())
            assert bool((book.abs() <= 1).all())
    sk = read_artifact(artifacts["skvq"], "skvq")["tensors"]
    assert sk["k_cluster_16"].shape == (2, 2, 16) and set(sk) >= {"k_clip_2_16", "v_clip_4_16", "inv_freq"}
    assert bool(((sk["k_clip_2_16"] >= 0.8) & (sk["k_clip_2_16"] <= 1.0)).all())


@pytest.mark.parametrize("name", ["kvquant", "skvq", "snapkv+kvquant", "snapkv+skvq"])
def test_engine_runs_and_holds_the_bytes_as_stored(tiny_dir, artifacts, name):
    """A 300-token prompt: two whole blocks of 128 (or what snapkv keeps) quantized, the rest in the
    residual; the bytes held are the codec's per block plus the residual's, far below full's."""
    from nanokv import LLM, SamplingParams

    quantizer = name.split("+")[-1]
    kw = {"compression": 0.5, "window_size": 8} if "+" in name else {}
    llm = LLM(str(tiny_dir), dtype="float32", method=name, calibration_file=str(artifacts[quantizer]), **kw)
    prompt = [(7 * i) % 200 + 30 for i in range(300)]
    # batched with a 7-token prompt, whose heads hold no cold block
    out, short = llm.generate([prompt, prompt[:7]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == len(short.token_ids) == 4
    per_head = 150 + 3 if "+" in name else 300 + 3          # snapkv keeps 150 of 300; 3 decoded tokens
    D, R = 16, 128
    expected = 2 * 2 * (per_head // R * llm.cache.spec.quantized_bytes(D) + per_head % R * (2 * D * 4 + 4))
    assert out.metrics["kv_cache_bytes_theory"] == expected
    full = LLM(str(tiny_dir), dtype="float32", method="full")
    [ref] = full.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    assert out.metrics["kv_cache_bytes"] < ref.metrics["kv_cache_bytes"]


# --- the engine against a plain restatement, on real weights ---------------------------------

class RestatedTiered:
    """The tiered cache restated as the model's attention callable: per layer the read-back cold
    blocks and the full-precision residual; each step attends over both in full, then every whole
    R tokens of the residual go cold, head by head, through `block(k, v, pos, head)` [R, D] ->
    read-back k, v."""

    def __init__(self, block, R):
        self.block, self.R, self.layers = block, R, {}

    def __call__(self, layer, q, k, v, sliding_window):
        from nanokv.kernels.reference import attention_by_position

        empty = k[:0], v[:0]
        kq, vq, kf, vf, pf = self.layers.get(layer, (*empty, *empty, self.positions[:0]))
        kf, vf, pf = torch.cat([kf, k]), torch.cat([vf, v]), torch.cat([pf, self.positions])
        keys, values = torch.cat([kq, kf]), torch.cat([vq, vf])
        # cold tokens are older than every query: their order (sink-first) does not matter
        key_pos = torch.cat([torch.zeros(len(kq), dtype=pf.dtype), pf])
        out = attention_by_position(q, keys, values, self.positions, key_pos)
        while len(kf) >= self.R:
            R, H = self.R, k.shape[1]
            read = [self.block(kf[:R, h], vf[:R, h], pf[:R], h) for h in range(H)]
            kq = torch.cat([kq, torch.stack([r[0] for r in read], 1).to(k.dtype)])
            vq = torch.cat([vq, torch.stack([r[1] for r in read], 1).to(v.dtype)])
            kf, vf, pf = kf[R:], vf[R:], pf[R:]
        self.layers[layer] = (kq, vq, kf, vf, pf)
        return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kvquant", "skvq"])
def test_engine_matches_a_plain_restatement_on_real_weights(smollm2_gguf, tmp_path, method):
    """SmolLM2, a 230-token prompt (one block cold at prefill, a second during decode), 30 greedy
    tokens through the engine and through RestatedTiered with the restated blocks; hand-set
    calibrations (codebooks, clusters and clip ratios chosen here)."""
    from helpers import restated_greedy
    from nanokv import LLM, SamplingParams
    from nanokv.calibrate import model_key, write_artifact

    full = LLM(str(smollm2_gguf), dtype="float32", method="full")
    inv_freq = full.model.inv_freq.float().cpu()
    L, H, D = 30, 3, 64
    common = {"format": 1, "method": method, "model": model_key(str(smollm2_gguf)), "num_layers": L,
              "num_kv_heads": H, "head_dim": D, "settings": {}}
    if method == "kvquant":
        kb = torch.tensor([-1.0, -0.3, 0.25, 1.0]).expand(L, -1).contiguous()
        vb = torch.tensor([-1.0, -0.2, 0.35, 1.0]).expand(L, -1).contiguous()
        tensors = {"k_codebook_2": kb, "v_codebook_2": vb, "k_codebook_4": torch.linspace(-1, 1, 16).expand(L, -1),
                   "v_codebook_4": torch.linspace(-1, 1, 16).expand(L, -1)}
        room = math.ceil(0.01 * 128 * D)

        def block(k, v, pos, head):
            return restated_kvquant_block(k, v, pos, kb[0], vb[0], inv_freq, room)
    else:
        k_clusters = (torch.arange(D) % 3 == 0).long().expand(L, H, -1).contiguous()   # any fixed grouping
        v_clusters = (torch.arange(D) < 16).long().expand(L, H, -1).contiguous()
        clip = torch.full((L,), 0.95)
        tensors = {"k_cluster_32": k_clusters, "v_cluster_32": v_clusters, "k_clip_2_32": clip, "v_clip_2_32": clip.clone()}

        def block(k, v, pos, head):
            return restated_skvq_block(k, v, pos, k_clusters[0, head], v_clusters[0, head], 0.95, 0.95, 2,
                                       inv_freq, 5)
    tensors["inv_freq"] = inv_freq.expand(L, -1).contiguous()
    path = tmp_path / f"{method}.safetensors"
    write_artifact(path, {**common, "tensors": {n: t.contiguous() for n, t in tensors.items()}})
    llm = LLM(str(smollm2_gguf), dtype="float32", method=method, calibration_file=str(path))
    prompt, steps = list(range(1000, 1230)), 30
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert out.token_ids == restated_greedy(llm.model, RestatedTiered(block, 128), prompt, steps)


def test_no_cold_blocks_decode_to_nothing():
    """A batch whose heads hold no cold block yet (the decode step reads [B, H, 0, ...] fields)."""
    books = torch.stack([torch.tensor([-1.0, -0.25, 0.5, 1.0])] * 2)
    clusters = torch.zeros(2, 2, 8, dtype=torch.long)
    for codec in (KVQuantCodec(2, books, books, INV_FREQ, block_size=16),
                  SKVQCodec(2, 2, 1, clusters, clusters, torch.ones(2), torch.ones(2), INV_FREQ, block_size=16)):
        fields = {n: torch.zeros(1, 2, 0, *shape, dtype=dtype) for n, (dtype, shape) in codec.field_shapes(8).items()}
        k, v = codec.decode(fields, 1)
        assert k.shape == v.shape == (1, 2, 0, 16, 8)
