"""Issue 29, calibrated query-aware readers: loki (top tokens by attention over the keys' top
principal directions) and double_sparsity (over a few calibrated outlier channels). Picks on
hand-built keys through a ReadStep, the calibrations against plain restatements on a tiny random
model, the command end to end, the engine against a plain restatement, continuous batching with
a budget covering the context (full's tokens), the bytes read, preemption, and bad options."""

import math
import re

import pytest
import torch

from helpers import DenseLayers, assert_preemption_repeats, restated_greedy
from nanokv.artifacts import FORMAT, model_key, write_artifact
from nanokv.methods import make_method
from nanokv.methods.base import ReadStep


@pytest.fixture(scope="module")
def tiny_dir(tiny_gqa_dir):
    return tiny_gqa_dir


def prompt(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def read_step(queries, keys, lengths, layer=0):
    """A ReadStep over hand-built queries [b, Hq, D] and keys [b, H, S, D] (blocks of 4)."""
    b, H, S, _ = keys.shape
    return ReadStep(layer, 1, queries, torch.full((b,), S), torch.tensor(lengths), 4, 4,
                    [{} for _ in range(b)], {}, keys=keys, key_positions=torch.arange(S).expand(b, H, S))


def artifact(method, tensors, H=2, D=4, L=1, model="m"):
    return {"format": FORMAT, "method": method, "model": model, "num_layers": L, "num_kv_heads": H,
            "head_dim": D, "settings": {}, "tensors": tensors}


def picked(picks):
    """Per (sequence, head), the picked slots in order, without the -1 padding."""
    return [[sorted(s for s in head.tolist() if s >= 0) for head in seq] for seq in picks.slots]


# --- loki: the picks ---------------------------------------------------------------------------

def test_loki_scores_in_the_top_principal_directions_only():
    # D = 4, d = 1: the top direction of both kv-heads is channel 2 (column 0 of the basis)
    basis = torch.eye(4)[:, [2, 0, 1, 3]].expand(1, 2, 4, 4).clone()
    loki = make_method("loki", budget=1)
    loki.bind_calibration(artifact("loki", {"k_basis": basis}))
    keys = torch.zeros(1, 2, 8, 4)
    keys[0, :, 5] = torch.tensor([10.0, 0, 1, 0])   # the highest q . k, low in channel 2
    keys[0, :, 3] = torch.tensor([0.0, 0, 2, 0])    # the highest in channel 2
    keys[0, 1, 7] = torch.tensor([0.0, 0, 9, 0])    # higher still, but head 1 holds only 6 slots
    q = torch.tensor([1.0, 0, 1, 0]).expand(1, 4, 4)
    picks = loki.pick(read_step(q, keys, [[8, 6]]))
    assert picked(picks) == [[[3], [3]]]
    assert int(picks.scored_bytes) == (8 + 6) * 1 * 4        # one number of every held key, float32
    # every direction: the exact q . k, so slot 5 wins; a budget past the held slots picks them all
    loki = make_method("loki", budget=16, dim_fraction=1.0)
    loki.bind_calibration(artifact("loki", {"k_basis": basis}))
    picks = loki.pick(read_step(q, keys, [[8, 6]]))
    assert picked(picks) == [[list(range(8)), list(range(6))]]
    assert int(picks.scored_bytes) == (8 + 6) * 4 * 4
    loki = make_method("loki", budget=1, dim_fraction=1.0)
    loki.bind_calibration(artifact("loki", {"k_basis": basis}))
    assert picked(loki.pick(read_step(q, keys, [[8, 6]]))) == [[[5], [5]]]


def test_loki_ranks_a_kv_head_by_the_highest_of_its_query_heads():
    # d = 2 on the identity basis: channels 0 and 1. Query head 0 wants slot 1, query head 1 slot 2
    # more strongly: the group (kv-head 0) reads slot 2; kv-head 1's queries want slot 0
    loki = make_method("loki", budget=1, dim_fraction=0.5)
    loki.bind_calibration(artifact("loki", {"k_basis": torch.eye(4).expand(1, 2, 4, 4).clone()}))
    keys = torch.zeros(1, 2, 4, 4)
    keys[0, :, 0] = torch.tensor([0.0, 0, 5, 5])    # outside the top directions: never wins
    keys[0, :, 1] = torch.tensor([1.0, 0, 0, 0])
    keys[0, :, 2] = torch.tensor([0.0, 1, 0, 0])
    keys[0, :, 3] = torch.tensor([0.5, 0.5, 0, 0])  # 1.5 at most for kv-head 0, -1 for kv-head 1
    q = torch.tensor([[[2.0, 0, 0, 0], [0, 3, 0, 0], [-1, -1, 1, 1], [-1, -1, 1, 1]]])
    assert picked(loki.pick(read_step(q, keys, [[4, 4]]))) == [[[2], [0]]]


# --- double_sparsity: the picks ----------------------------------------------------------------

def test_double_sparsity_scores_on_the_groups_outlier_channels():
    # qk magnitudes per query head (2 per kv-head): kv-head 0's group sums to channel 3 largest
    # (3 + 0.5 against 2 + 1 for channel 1), kv-head 1's to channel 0
    qk = torch.tensor([[[0.0, 2, 0, 0.5], [0, 1, 0, 3], [4, 0, 0, 0], [1, 0, 0, 0]]])
    k_only = torch.tensor([[[0.0, 9, 0, 0], [0, 9, 0, 0]]])              # by |k|: channel 1 in both
    ds = make_method("double_sparsity", budget=1, channel_fraction=0.25, skip_layers=0)
    ds.bind_calibration(artifact("double_sparsity", {"qk_channels": qk, "q_channels": qk, "k_channels": k_only}))
    assert ds.outlier_channels(0, 4, "cpu").tolist() == [[3], [0]]
    keys = torch.zeros(1, 2, 6, 4)
    keys[0, :, 1] = torch.tensor([0.0, 8, 0, 0])
    keys[0, :, 2] = torch.tensor([0.0, 0, 0, 1])
    keys[0, :, 4] = torch.tensor([1.0, 0, 0, 0])
    q = torch.ones(1, 4, 4)
    picks = ds.pick(read_step(q, keys, [[6, 6]]))
    assert picked(picks) == [[[2], [4]]]
    assert int(picks.scored_bytes) == 12 * 1 * 4
    ds = make_method("double_sparsity", budget=1, channel_fraction=0.25, outliers="k", skip_layers=0)
    ds.bind_calibration(artifact("double_sparsity", {"qk_channels": qk, "q_channels": qk, "k_channels": k_only}))
    assert picked(ds.pick(read_step(q, keys, [[6, 6]]))) == [[[1], [1]]]


# --- the calibrations, restated ------------------------------------------------------------------

def recorded(model, texts):
    """Per layer, the post-RoPE queries and keys [T, heads, D] of every text, concatenated."""
    from nanokv.calibrate.dense import run_dense

    seen = {}

    def record(layer, q, k, sliding_window):
        seen.setdefault(layer, []).append((q.double(), k.double()))

    for ids in texts:
        run_dense(model, ids, record)
    return {layer: (torch.cat([q for q, _ in parts]), torch.cat([k for _, k in parts]))
            for layer, parts in seen.items()}


def test_loki_bases_are_the_principal_components_of_the_post_rope_keys(tiny):
    from nanokv.calibrate.loki import loki_bases

    model, cfg = tiny
    texts = [prompt(60, seed) for seed in (1, 2)]
    out = loki_bases(model, cfg, texts)
    assert out["k_basis"].shape == (2, 2, cfg.head_dim, cfg.head_dim)
    for layer, (_, k) in recorded(model, texts).items():
        for h in range(cfg.num_kv_heads):
            x = k[:, h] - k[:, h].mean(0)
            _, s, vh = torch.linalg.svd(x, full_matrices=False)          # PCA as sklearn: centred SVD
            variance = s ** 2 / len(x)
            assert torch.allclose(out["k_variance"][layer, h].double(), variance, rtol=1e-3, atol=1e-5)
            basis = out["k_basis"][layer, h].double()
            assert torch.allclose(basis.T @ basis, torch.eye(cfg.head_dim, dtype=torch.float64), atol=1e-4)
            for i in range(4):  # the leading directions, up to sign
                assert abs(float(basis[:, i] @ vh[i])) == pytest.approx(1, abs=1e-3)


def test_double_sparsity_magnitudes_are_the_official_means(tiny):
    from nanokv.calibrate.double_sparsity import channel_magnitudes
    from nanokv.calibrate.duoattention import undo_rope
    from nanokv.models.rope import rope_cos_sin

    model, cfg = tiny
    texts = [prompt(50, seed) for seed in (3, 4)]
    out = channel_magnitudes(model, cfg, texts)
    cos, sin = rope_cos_sin(torch.arange(50), model.inv_freq, torch.float32)
    group = cfg.num_heads // cfg.num_kv_heads
    for layer, (q, k) in recorded(model, texts).items():
        qk = (q * k.repeat_interleave(group, dim=1)).abs().mean(0)       # each token with its own key
        assert torch.allclose(out["qk_channels"][layer].double(), qk, rtol=1e-4, atol=1e-6)
        # before RoPE: each text rotated back by its own positions
        pre_q = torch.cat([undo_rope(part.float(), cos, sin) for part in q.split(50)]).double()
        pre_k = torch.cat([undo_rope(part.float(), cos, sin) for part in k.split(50)]).double()
        assert torch.allclose(out["q_channels"][layer].double(), pre_q.abs().mean(0), rtol=1e-4, atol=1e-6)
        assert torch.allclose(out["k_channels"][layer].double(), pre_k.abs().mean(0), rtol=1e-4, atol=1e-6)


# --- the engine ----------------------------------------------------------------------------------

class DenseReader(DenseLayers):
    """Loki or Double Sparsity stated plainly, as the model's attention callable: every layer keeps
    all its keys; a decode step from layer `skip` on scores, per kv-head, each of its query heads'
    low(q) . low(k) / sqrt(D) over every key (low: `project(layer, head, x)`, a basis' first
    directions or the outlier channels), takes the highest over the group, and attends over the
    top `budget` keys only."""

    def __init__(self, project, budget, skip):
        super().__init__()
        self.project, self.budget, self.skip = project, budget, skip

    def decode(self, layer, q, keys, values):
        n, H, D = keys.shape
        if layer < self.skip:
            return self.dense(q, keys, values)
        group, chosen = q.shape[1] // H, []
        for h in range(H):
            heads = slice(h * group, (h + 1) * group)
            logits = self.project(layer, h, q[0, heads].float()) @ self.project(layer, h, keys[:, h].float()).T
            chosen.append((logits / math.sqrt(D)).amax(0).topk(min(self.budget, n)).indices.sort().values)
        return self.attend(q, keys, values, chosen)


def random_artifact(tmp_path, tiny_dir, method):
    """A hand-made artifact for the tiny model: random orthonormal bases, or random magnitudes."""
    gen = torch.Generator().manual_seed(7)
    if method == "loki":
        tensors = {"k_basis": torch.linalg.qr(torch.randn(2, 2, 32, 32, generator=gen)).Q.contiguous(),
                   "k_variance": torch.ones(2, 2, 32)}
    else:
        tensors = {f"{kind}_channels": torch.rand(2, heads, 32, generator=gen)
                   for kind, heads in (("qk", 4), ("q", 4), ("k", 2))}
    path = tmp_path / f"{method}.safetensors"
    write_artifact(path, artifact(method, tensors, H=2, D=32, L=2, model=model_key(str(tiny_dir))))
    return path, tensors


@pytest.mark.parametrize("method, skip", [("loki", 0), ("double_sparsity", 1)])
def test_engine_matches_a_plain_restatement(tiny_dir, tmp_path, method, skip):
    from nanokv import LLM, SamplingParams

    path, tensors = random_artifact(tmp_path, tiny_dir, method)
    budget, steps, ids = 24, 12, prompt(100)
    llm = LLM(str(tiny_dir), dtype="float32", method=method, budget=budget, skip_layers=skip,
              calibration_file=str(path))
    [out] = llm.generate([ids], SamplingParams(max_tokens=steps, ignore_eos=True))
    if method == "loki":                                             # d = 8 of 32
        def project(layer, h, x):
            return x @ tensors["k_basis"][layer, h, :, :8]
    else:                                                            # r = 4 of 32, the group's sum
        channels = tensors["qk_channels"].view(2, 2, 2, 32).sum(2).topk(4, dim=-1).indices

        def project(layer, h, x):
            return x[..., channels[layer, h]]
    assert out.token_ids == restated_greedy(llm.model, DenseReader(project, budget, skip), ids, steps)


@pytest.mark.parametrize("method", ["loki", "double_sparsity"])
def test_batched_a_covering_budget_is_full_and_reads_fall_with_the_budget(tiny_dir, tmp_path, method):
    from nanokv import LLM, SamplingParams

    path, _ = random_artifact(tmp_path, tiny_dir, method)
    prompts = [prompt(n, seed) for n, seed in ((40, 1), (75, 2), (100, 3))]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    full = LLM(str(tiny_dir), dtype="float32", max_num_seqs=2)
    expected = [o.token_ids for o in full.generate(prompts, params)]
    read = {}
    for budget in (1024, 32, 8):
        llm = LLM(str(tiny_dir), dtype="float32", method=method, budget=budget, skip_layers=0, max_num_seqs=2,
                  calibration_file=str(path))
        outs = llm.generate(prompts, params)
        read[budget] = llm.stats["kv_bytes_read_per_decode_token"]
        assert all(len(o.token_ids) == 8 for o in outs)
        if budget == 1024:  # every held slot picked: the attention full runs
            assert [o.token_ids for o in outs] == expected
            assert all(o.metrics["kv_cache_bytes"] == o.metrics["kv_cache_bytes_uncompressed"] for o in outs)
            assert llm.cache.pool.bytes_per_block == full.cache.pool.bytes_per_block   # no page bounds kept
    # the covering budget reads every held token (K, V: 2 x 32 float32, its int32 position) and scores
    # each on d = 8 or r = 4 of its 32 numbers, in 2 layers x 2 kv-heads; decode step j of 7 holds
    # prompt + j tokens
    scored = 8 if method == "loki" else 4
    held = [n + j for n in (40, 75, 100) for j in range(1, 8)]
    assert read[1024] == pytest.approx(sum(2 * 2 * h * (2 * 32 * 4 + 4 + scored * 4) for h in held) / len(held))
    assert read[1024] > read[32] > read[8]
    assert read[8] < 0.3 * full.stats["kv_bytes_read_per_decode_token"]


@pytest.mark.parametrize("method", ["loki", "double_sparsity"])
def test_preemption_recomputes_densely(tiny_dir, tmp_path, method):
    """A pool too small for the batch preempts; the recompute runs densely, so with a budget that
    covers the context it repeats the roomy engine's tokens, and with a small one it still finishes."""
    from functools import partial

    from nanokv import LLM, SamplingParams

    path, _ = random_artifact(tmp_path, tiny_dir, method)
    prompts = [prompt(n, seed) for n, seed in ((40, 1), (75, 2), (100, 3))]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    for budget in (1024, 16):
        make_llm = partial(LLM, str(tiny_dir), dtype="float32", method=method, budget=budget, skip_layers=0,
                           calibration_file=str(path))
        if budget == 1024:
            assert_preemption_repeats(make_llm, prompts, params, blocks=2 * 2 * 12)
        else:
            roomy = make_llm()
            tight = make_llm(kv_cache_memory=2 * 2 * 12 * roomy.cache.pool.bytes_per_block)
            outs = tight.generate(prompts, params)
            assert tight.stats["preemptions"] > 0 and all(len(o.token_ids) == 40 for o in outs)


@pytest.mark.parametrize("method, fitted", [("loki", "principal directions"), ("double_sparsity", "mean |q k|")])
def test_calibrate_command_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys, method, fitted):
    from safetensors import safe_open

    from nanokv import LLM, SamplingParams
    from nanokv.calibrate import cli

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate {method} --model {tiny_dir}")):
        LLM(str(tiny_dir), dtype="float32", method=method, budget=16)
    assert cli.main([method, "--model", str(tiny_dir), "--samples", "2", "--length", "64", "--device", "cpu"]) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / f"{method}.safetensors"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    with safe_open(str(path), framework="pt") as f:
        assert fitted in f.metadata()["nanokv"]
        shapes = {name: tuple(f.get_tensor(name).shape) for name in f.keys()}
    assert shapes == ({"k_basis": (2, 2, 32, 32), "k_variance": (2, 2, 32)} if method == "loki" else
                      {"qk_channels": (2, 4, 32), "q_channels": (2, 4, 32), "k_channels": (2, 2, 32)})
    llm = LLM(str(tiny_dir), dtype="float32", method=method, budget=16, skip_layers=0)
    outs = llm.generate([prompt(n, n) for n in (30, 50, 70)], SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)


# --- bad input -----------------------------------------------------------------------------------

def test_bad_options_budgets_and_calibrations(tiny_dir, tmp_path):
    from nanokv import LLM

    for method, option, value, valid in [
            ("loki", "dim_fraction", 0.0, re.escape("a fraction in (0, 1]")),
            ("loki", "dim_fraction", 1.5, re.escape("a fraction in (0, 1]")),
            ("loki", "skip_layers", -1, "an integer >= 0"),
            ("double_sparsity", "channel_fraction", 0.0, re.escape("a fraction in (0, 1]")),
            ("double_sparsity", "outliers", "kq", "one of qk, q, k")]:
        with pytest.raises(ValueError, match=f"option {option}={value!r} of method '{method}' must be {valid}"):
            make_method(method, **{option: value})
    for method in ("loki", "double_sparsity"):
        with pytest.raises(ValueError, match="give --budget .* not --compression=0.5"):
            make_method(method, compression=0.5)
        with pytest.raises(ValueError, match="budget must be a positive number of tokens, got 0"):
            make_method(method, budget=0)
        assert make_method(method).budget == {"loki": 1024, "double_sparsity": 256}[method]
    # an artifact of another head_dim, and one whose tensors lack what the method reads
    path = tmp_path / "loki.safetensors"
    write_artifact(path, artifact("loki", {"k_basis": torch.eye(16).expand(2, 2, 16, 16).clone()}, D=16, L=2,
                                  model=model_key(str(tiny_dir))))
    with pytest.raises(ValueError, match="is for head_dim 16, but the model's is 32"):
        LLM(str(tiny_dir), dtype="float32", method="loki", calibration_file=str(path))
    with pytest.raises(ValueError, match="k_basis is missing"):
        make_method("loki").bind_calibration(artifact("loki", {"k_variance": torch.ones(1, 2, 4)}))
    with pytest.raises(ValueError, match="k_channels is of shape \\(1, 3, 4\\), expected"):
        make_method("double_sparsity", outliers="k").bind_calibration(
            artifact("double_sparsity", {"k_channels": torch.ones(1, 3, 4)}))
