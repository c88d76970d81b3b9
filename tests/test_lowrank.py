"""LoRC and Palu: tokens stored as low-rank latents (nanokv/cache/latent_cache.py) in bases from
nanokv/calibrate/lowrank.py. The storage against the projection formula, the truncation error
against the spectrum, the rank allocations by hand, the engine against a dense restatement of the
model with low-rank keys and values, real bytes, preemption, and the calibration's errors."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from nanokv.kernels.reference import attention_by_position
from nanokv.models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from nanokv.cache.latent_cache import LatentKVCache, LatentLayer
from nanokv.calibrate import load_calibration, write_artifact
from nanokv.calibrate.dense import run_dense
from nanokv.calibrate.lowrank import weight_bases, whitened_bases
from nanokv.methods import make_method
from nanokv.methods.lorc import progressive_ranks
from nanokv.methods.lowrank import spread
from tests.helpers import assert_preemption_repeats, restated_greedy


def orthonormal(gen, *shape):
    return torch.linalg.qr(torch.randn(*shape, generator=gen))[0]


def rotate(x, positions, inv_freq, inverse=False):
    """RoPE on x [T, H, D] at positions [T] (off, with `inverse`), float32."""
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    return apply_rope(x.float(), cos, -sin if inverse else sin)


def project(x, basis, bias):
    """x [T, G * gD] onto each group's basis [G, gD, r] around bias [G, gD] -> [T, G * gD]."""
    T, G = len(x), basis.shape[0]
    x = x.reshape(T, G, -1) - bias
    return (torch.einsum("tgd,gdr,ger->tge", x, basis, basis) + bias).reshape(T, -1)


def latent_cache(cfg, layers, group, inv_freq, memory=8 << 20):
    return LatentKVCache.from_memory(cfg, memory, layers, group, inv_freq, 16, torch.float32)


def store_sequence(cache, seq_id, layer, k, v, positions):
    if seq_id not in cache.seqs:
        cache.add(seq_id)
    slots = cache.append_slots(seq_id, len(k), layers=slice(layer, layer + 1))[0]
    cache.store(layer, slots, k, v, positions)


def read_sequence(cache, seq_id, layer):
    """(keys, values rebuilt from their latents through values_out, positions, held) of one sequence."""
    s = cache.seqs[seq_id]
    tables = s.tables[layer:layer + 1, :, :int(s.num_blocks[layer].max())]
    keys, latents, positions, held = cache.read(layer, tables, s.lengths[layer:layer + 1])
    return keys, cache.values_out(layer, latents.transpose(1, 2)).transpose(1, 2), positions, held


def test_latents_rebuild_the_projected_keys_and_values_and_full_rank_gives_them_back():
    gen = torch.Generator().manual_seed(0)
    cfg = SimpleNamespace(num_layers=2, num_kv_heads=4, head_dim=32)
    group, G, gd = 2, 2, 64
    inv_freq = inverse_frequencies(32, 10000.0, {})
    full = LatentLayer(orthonormal(gen, G, gd, gd), orthonormal(gen, G, gd, gd), torch.randn(G, gd, generator=gen),
                       torch.randn(G, gd, generator=gen))
    low = LatentLayer(full.k_basis[..., :32], full.v_basis[..., :16], full.k_bias, full.v_bias)
    cache = latent_cache(cfg, [full, low], group, inv_freq)
    assert cache.slots_per_token.tolist() == [4, 2]  # (64 + 64) / 32 and (32 + 16) / 32, rounded up
    for seq_id, n in ((0, 37), (1, 5)):
        k, v = torch.randn(n, 4, 32, generator=gen), torch.randn(n, 4, 32, generator=gen)
        positions = torch.arange(3, 3 + n) * 7  # gaps: positions are data
        for layer in (0, 1):
            store_sequence(cache, seq_id, layer, k, v, positions)
        keys, values, k_pos, held = read_sequence(cache, seq_id, 0)
        assert held.tolist() == [[n] * 4] and (k_pos[0, :, :n] == positions).all()
        torch.testing.assert_close(keys[0, :, :n].transpose(0, 1), k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[0, :, :n].transpose(0, 1), v, atol=1e-5, rtol=1e-5)
        keys, values, _, held = read_sequence(cache, seq_id, 1)
        k_pre = rotate(k, positions, inv_freq, inverse=True).reshape(n, -1)
        expected_k = rotate(project(k_pre, low.k_basis, low.k_bias).view(n, 4, 32), positions, inv_freq)
        expected_v = project(v.reshape(n, -1), low.v_basis, low.v_bias).view(n, 4, 32)
        torch.testing.assert_close(keys[0, :, :n].transpose(0, 1), expected_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[0, :, :n].transpose(0, 1), expected_v, atol=1e-5, rtol=1e-5)
        assert held.tolist() == [[n] * 4]
    assert int(cache.seqs[0].num_blocks[1].sum()) == G * math.ceil(37 * 2 / 16)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from nanokv.loading import load_model

    return load_model("gguf", smollm2_gguf, torch.float32)


def truncation_error(cache, layer, k_pre, v, inv_freq):
    """Squared error of the keys (before RoPE) and values [T, H, D] stored and read back."""
    positions = torch.arange(len(k_pre))
    store_sequence(cache, 0, layer, rotate(k_pre, positions, inv_freq), v, positions)
    keys, values, _, _ = read_sequence(cache, 0, layer)
    keys = rotate(keys[0].transpose(0, 1)[:len(k_pre)], positions, inv_freq, inverse=True)
    return float(((keys - k_pre) ** 2).sum()), float(((values[0].transpose(0, 1)[:len(v)] - v) ** 2).sum())


@pytest.mark.parametrize("rank", [64, 128])
@pytest.mark.slow
def test_lorc_latents_miss_exactly_the_weight_spectrum_they_drop(smollm2, rank):
    # The keys of the inputs e_1..e_hidden are W_k's columns: storing them at rank r loses the sum of
    # W_k's squared singular values past r (Eckart-Young), the same for values.
    model, cfg = smollm2
    bases = weight_bases(model, cfg, group=3)
    layer = 7
    layers = [LatentLayer(bases["k_basis"][l][..., :rank], bases["v_basis"][l][..., :rank], bases["k_bias"][l],
                          bases["v_bias"][l]) for l in range(cfg.num_layers)]
    cache = latent_cache(cfg, layers, 3, model.inv_freq, memory=64 << 20)
    attn = model.layers[layer].self_attn
    w_k, w_v = attn.qkv_proj.weight.detach().float().split([cfg.q_size, cfg.kv_size, cfg.kv_size])[1:]
    k_pre, v = w_k.T.reshape(-1, 3, 64), w_v.T.reshape(-1, 3, 64)
    k_error, v_error = truncation_error(cache, layer, k_pre, v, model.inv_freq)
    assert k_error == pytest.approx(float((bases["k_spectrum"][layer, 0, rank:] ** 2).sum()), rel=1e-3)
    assert v_error == pytest.approx(float((bases["v_spectrum"][layer, 0, rank:] ** 2).sum()), rel=1e-3)
    assert bases["k_condition"][layer] > 1


@pytest.mark.slow
def test_palu_latents_miss_exactly_the_calibration_spectrum_they_drop(smollm2):
    # Palu's bases are the calibration keys' principal directions: the same keys stored at rank r
    # lose the sum of the eigenvalues past r (the whitened SVD's squared singular values).
    model, cfg = smollm2
    ids = [(17 * i + 5) % 3000 + 100 for i in range(80)]
    bases = whitened_bases(model, cfg, [ids], group=3)
    _, kv = run_dense(model, ids, sources=list(range(cfg.num_layers)))
    layer, rank = 11, 48
    positions = torch.arange(len(ids))
    k_pre = rotate(kv[layer][0], positions, model.inv_freq, inverse=True)
    layers = [LatentLayer(bases["k_basis"][l][..., :rank], bases["v_basis"][l][..., :rank], bases["k_bias"][l],
                          bases["v_bias"][l]) for l in range(cfg.num_layers)]
    cache = latent_cache(cfg, layers, 3, model.inv_freq)
    k_error, v_error = truncation_error(cache, layer, k_pre, kv[layer][1].float(), model.inv_freq)
    assert k_error == pytest.approx(float((bases["k_spectrum"][layer, 0, rank:] ** 2).sum()), rel=1e-3)
    assert v_error == pytest.approx(float((bases["v_spectrum"][layer, 0, rank:] ** 2).sum()), rel=1e-3)


def test_lorc_ranks_grow_with_the_cumulative_condition_number_and_meet_the_budget():
    conditions = torch.tensor([30.0, 10.0, 50.0, 5.0, 20.0, 8.0])
    ranks = progressive_ranks(conditions, 192, 0.5, 16)
    cumulative = [sum(math.log(c) for c in conditions[l:].tolist()) for l in range(6)]
    assert torch.argsort(ranks).tolist() == sorted(range(6), key=lambda l: cumulative[l])  # deeper: smaller
    assert float(ranks.mean()) == pytest.approx(96.0)
    assert float(ranks.min()) >= 16 - 1e-9
    lorc = make_method("lorc", compression=0.5)
    assert lorc.round_rank(100.0, 192) == 96 and lorc.round_rank(3.0, 192) == 16 and lorc.round_rank(300.0, 192) == 192
    mild = progressive_ranks(conditions, 192, 0.9, 16)  # room enough: the shallowest keeps everything
    assert float(mild.max()) == pytest.approx(192.0) and float(mild.mean()) == pytest.approx(0.9 * 192)


def test_palu_shares_the_kept_rank_in_proportion_to_fisher_information():
    assert spread(torch.tensor([1.0, 3.0]), 10, 8).tolist() == [3, 7]   # 2.5 + 7.5: one more, in order
    assert spread(torch.tensor([1.0, 9.0]), 12, 8).tolist() == [4, 8]   # capped at full: the rest goes on
    L, G, gd = 2, 1, 64
    artifact = {"tensors": {"k_basis": torch.zeros(L, G, gd, gd), "k_fisher": torch.tensor([3.0, 1.0]),
                            "v_fisher": torch.tensor([1.0, 3.0])}}
    # kept: 0.5 x 4 units x 64 = 128, shared 48 / 16 / 16 / 48, each rounded to a multiple of 32
    assert make_method("palu", compression=0.5).ranks(artifact) == ([64, 32], [32, 64])


class LowRankDense:
    """A restatement: the model's attention over every token so far, each layer's keys and values
    replaced by their projections onto the kept columns of the artifact's bases (keys before RoPE)."""

    def __init__(self, tensors, ranks, inv_freq):
        self.tensors, self.ranks, self.inv_freq, self.kv = tensors, ranks, inv_freq, {}

    def __call__(self, layer, q, k, v, sliding_window):
        t, (rk, rv) = self.tensors, self.ranks[layer]
        T, H, D = k.shape
        k_pre = rotate(k, self.positions, self.inv_freq, inverse=True).reshape(T, -1)
        k = rotate(project(k_pre, t["k_basis"][layer][..., :rk], t["k_bias"][layer]).view(T, H, D),
                   self.positions, self.inv_freq)
        v = project(v.float().reshape(T, -1), t["v_basis"][layer][..., :rv], t["v_bias"][layer]).view(T, H, D)
        keys, values, positions = self.kv.get(layer, (k[:0], v[:0], self.positions[:0]))
        keys, values, positions = torch.cat([keys, k]), torch.cat([values, v]), torch.cat([positions, self.positions])
        self.kv[layer] = keys, values, positions
        return attention_by_position(q, keys, values, self.positions, positions, sliding_window)


@pytest.fixture(scope="module")
def artifacts(smollm2, tmp_path_factory):
    """lorc and palu artifacts for SmolLM2, made in-process (palu over two short texts)."""
    model, cfg = smollm2
    folder = tmp_path_factory.mktemp("lowrank")
    texts = [[(13 * i + 7 * s) % 3000 + 100 for i in range(96)] for s in range(2)]
    from nanokv.calibrate.lowrank import fisher_information

    made = {"lorc": weight_bases(model, cfg, 3), "palu": {**whitened_bases(model, cfg, texts, 3),
                                                          **fisher_information(model, cfg, texts)}}
    paths = {}
    for method, tensors in made.items():
        paths[method] = folder / f"{method}.safetensors"
        write_artifact(paths[method], {"format": 1, "method": method, "model": "smollm2-135m", "num_layers": 30,
                                       "num_kv_heads": 3, "group": 3, "head_dim": 64, "settings": {},
                                       "tensors": tensors})
    return paths


@pytest.mark.parametrize("name", ["lorc", "palu"])
@torch.inference_mode()
@pytest.mark.slow
def test_the_engine_equals_the_model_with_low_rank_keys_and_values(smollm2_gguf, artifacts, name):
    from nanokv import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), dtype="float32", method=name, compression=0.5, calibration_file=str(artifacts[name]),
              max_num_seqs=2)
    ranks = [layer.ranks for layer in llm.method.latent_layers]
    assert len(set(ranks)) > 1  # layers keep different ranks, so tokens take different slots
    prompts = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((60, 25, 90))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    tensors = load_calibration(name, "smollm2-135m", 30, 3, artifacts[name], 64)["tensors"]
    per_block, G = llm.cache.pool.bytes_per_block, 1
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == restated_greedy(llm.model, LowRankDense(tensors, ranks, llm.model.inv_freq), prompt, 6)
        held = len(prompt) + 5
        slots = [-(-(rk + rv) // 32) for rk, rv in ranks]
        assert out.metrics["kv_cache_bytes"] == sum(G * math.ceil(held * m / 16) for m in slots) * per_block
        theory = held * sum((rk + rv) * 4 + 4 for rk, rv in ranks)
        assert out.metrics["kv_cache_bytes_theory"] == theory
        assert 1.0 <= out.metrics["kv_cache_bytes"] / theory < 1.1
        full = out.metrics["kv_cache_bytes_uncompressed"]
        assert full == 30 * 3 * math.ceil(held / 16) * 16 * (2 * 64 * 4 + 4)
        assert theory / (held * 30 * 3 * (2 * 64 * 4 + 4)) == pytest.approx(0.5, abs=0.03)  # half the numbers


@pytest.mark.slow
def test_preemption_recomputes_the_same_tokens(smollm2_gguf, artifacts):
    from nanokv import LLM, SamplingParams

    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(40)] for i in range(6)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    assert_preemption_repeats(partial(LLM, str(smollm2_gguf), dtype="float32", method="palu", compression=0.5,
                                      calibration_file=str(artifacts["palu"])), prompts, params, 1500)


@pytest.mark.slow
def test_a_missing_or_mismatched_calibration_is_a_clear_error(smollm2_gguf, artifacts, tmp_path):
    from nanokv import LLM
    from nanokv.artifacts import read_artifact as _read

    with pytest.raises(ValueError, match=r"does not exist; method lorc needs one: run `python -m nanokv.calibrate "
                                         r"lorc --model"):
        LLM(str(smollm2_gguf), method="lorc", compression=0.5, calibration_file=str(tmp_path / "none.safetensors"))
    artifact = _read(artifacts["palu"], "palu")
    with pytest.raises(ValueError, match="made for method 'palu', not 'lorc'"):
        load_calibration("lorc", "smollm2-135m", 30, 3, artifacts["palu"], 64)
    with pytest.raises(ValueError, match="head_dim 64, but the model's is 128"):
        load_calibration("palu", "smollm2-135m", 30, 3, artifacts["palu"], 128)
    with pytest.raises(ValueError, match="30 layers x 3 kv-heads, but model 'smollm2-135m' has 30 x 2"):
        load_calibration("palu", "smollm2-135m", 30, 2, artifacts["palu"], 64)
    broken = tmp_path / "palu.safetensors"
    write_artifact(broken, {**artifact, "group": 2})
    with pytest.raises(ValueError, match="group 2 does not divide the model's 3 kv-heads"):
        load_calibration("palu", "smollm2-135m", 30, 3, broken, 64)
    artifact["tensors"]["v_basis"] = artifact["tensors"]["v_basis"][:, :, :10]
    write_artifact(broken, artifact)
    with pytest.raises(ValueError, match=r"tensor v_basis is of shape \(30, 1, 10, 192\), expected finite "
                                         r"\(30, 1, 192, 192\)"):
        load_calibration("palu", "smollm2-135m", 30, 3, broken, 64)
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    with pytest.raises(ValueError, match="is not valid safetensors"):
        load_calibration("palu", "smollm2-135m", 30, 3, tmp_path / "junk.safetensors", 64)
    with pytest.raises(ValueError, match="not budget"):
        make_method("palu", budget=64)
    with pytest.raises(ValueError, match="combine an eviction method with a quantization method"):
        make_method("snapkv+lorc", compression=0.5)


@pytest.mark.slow
def test_the_calibration_command_writes_bases_the_engine_reads(smollm2_gguf, tmp_path):
    from nanokv import LLM, SamplingParams
    from nanokv.calibrate.cli import main

    for method, extra in (("lorc", []), ("palu", ["--samples", "1", "--length", "32", "--group", "1"])):
        out = tmp_path / f"{method}.safetensors"
        assert main([method, "--model", "smollm2-135m", "--out", str(out), *extra]) == 0
        artifact = load_calibration(method, "smollm2-135m", 30, 3, out, 64)
        assert artifact["group"] == (3 if method == "lorc" else 1)
        basis = artifact["tensors"]["k_basis"][4, 0]
        torch.testing.assert_close(basis.T @ basis, torch.eye(len(basis)), atol=1e-4, rtol=0)
        llm = LLM(str(smollm2_gguf), dtype="float32", method=method, compression=0.5, calibration_file=str(out))
        assert llm.cache.num_kv_heads == 3 // artifact["group"]
        [result] = llm.generate([[300, 301, 302, 303]], SamplingParams(max_tokens=2, ignore_eos=True))
        assert len(result.token_ids) == 2
    assert main(["palu", "--model", "smollm2-135m", "--group", "2", "--out", str(tmp_path / "x")]) == 2
