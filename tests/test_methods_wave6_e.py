"""Issue 29, query-aware sparse decode: squeezed_attention (k-means clusters of the fixed context's
keys, made at the first decode step; each step reads the clusters whose centroid estimate passes a
calibrated threshold, within the budget, and everything after the context). Hand-built k-means and
picks through a ReadStep, option errors, the engine against a plain restatement, continuous
batching, preemption, bytes falling with the budget, and the calibration command end to end."""

import json
import math
import re

import pytest
import torch

from helpers import DenseLayers, restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods.base import ReadStep
from nanokv.methods.squeezed_attention import SqueezedAttention, cluster_estimates, kmeans


@pytest.fixture(scope="module")
def tiny_dir(tiny_gqa_dir):
    return tiny_gqa_dir


def prompt(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def artifact(path, model, layers=2, heads=2, top=0.02, layer_tops=None):
    """A hand-made calibration: thresholds rising evenly from 0 to `top` (sparsity s -> s * top)."""
    from nanokv.artifacts import model_key

    grid = lambda t: [t * i / 100 for i in range(101)]  # noqa: E731
    path.write_text(json.dumps({
        "format": 1, "method": "squeezed_attention", "model": model_key(model), "num_layers": layers, "num_kv_heads": heads,
        "thresholds": grid(top), "layer_thresholds": [grid(t) for t in (layer_tops or [top] * layers)],
        "settings": {"clusters": 0.05, "window": 100}}))
    return path


def read_step(keys, queries, compress_lens, lengths, states=None, layer=0):
    b, H, S, D = keys.shape
    return ReadStep(layer, 2, queries, lengths.max(-1).values - 1, lengths, 4, 4,
                    states if states is not None else [{} for _ in range(b)], {}, keys=keys,
                    key_positions=torch.arange(S).expand(b, H, S), compress_lens=compress_lens)


def picked(picks) -> list[list[list[int]]]:
    return [[sorted(s for s in head if s >= 0) for head in seq] for seq in picks.slots.tolist()]


# --- k-means and the estimate, by hand --------------------------------------------------------

def test_kmeans_groups_keys_by_direction_from_evenly_spaced_starts():
    e = torch.eye(4)
    # head 0: three directions in runs, each at its own scale (k-means sees directions, not lengths);
    # head 1: the same keys in another order
    keys0 = torch.stack([e[0] * 1, e[0] * 5, e[0] * 2, e[1] * 3, e[1] * 1, e[2] * 7, e[2] * 2, e[2] * 4, e[2] * 1])
    keys0 = keys0 + 0.01 * torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    order = torch.tensor([5, 0, 3, 6, 1, 7, 4, 2, 8])
    centroids, labels, sizes = kmeans(torch.stack([keys0, keys0[order]]), 3)
    for h, keys in enumerate((keys0, keys0[order])):
        direction = keys.abs().argmax(-1)
        groups = {d: set(labels[h][direction == d].tolist()) for d in range(3)}
        assert all(len(g) == 1 for g in groups.values()) and len(set.union(*groups.values())) == 3
        for d in range(3):
            c = groups[d].pop()
            assert int(sizes[h, c]) == int((direction == d).sum())
            assert torch.allclose(centroids[h, c], keys[direction == d].mean(0))   # the plain mean key
    again = kmeans(torch.stack([keys0, keys0[order]]), 3)
    assert all(torch.equal(a, b) for a, b in zip(again, (centroids, labels, sizes)))  # no randomness
    # as many clusters as keys: each its own, started at itself
    c, l, s = kmeans(keys0[None], 9)
    assert l.tolist() == [list(range(9))] and torch.equal(c[0], keys0) and s.tolist() == [[1] * 9]


def test_cluster_estimate_is_one_keys_share_of_the_estimated_softmax():
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])[None]      # [1, 1, 3, 2]
    sizes = torch.tensor([[[3, 1, 0]]])
    q = torch.tensor([[[2.0, 1.0], [0.0, 4.0]]])[None]                           # 2 query heads, one kv-head
    est = cluster_estimates(q, centroids, sizes)
    want = []
    for i in range(2):
        per_head = []
        for qg in q[0, 0]:
            e = [math.exp(float(qg @ c) / math.sqrt(2)) for c in centroids[0, 0]]
            per_head.append(e[i] / (3 * e[0] + 1 * e[1]))                          # the empty cluster weighs 0
        want.append(sum(per_head) / 2)
    assert torch.allclose(est[0, 0, :2], torch.tensor(want)) and est[0, 0, 2] == float("-inf")
    assert torch.allclose((est[0, 0, :2] * sizes[0, 0, :2]).sum(), torch.tensor(1.0))  # a softmax, shared out


# --- pick, through a ReadStep ------------------------------------------------------------------

def two_topics(b=1):
    """One kv-head of 2 query heads, D 4: a 12-token context whose first 5 keys point along e0 and
    next 5 along e1 (clustered: window 2), keys 10, 11 the window, 12 the token being decoded."""
    e = torch.eye(4)
    keys = torch.cat([e[0].expand(5, 4) * 2, e[1].expand(5, 4) * 2, e[3].expand(3, 4), torch.zeros(3, 4)])
    keys = keys + 0.01 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    queries = (e[1] * 3).expand(b, 2, 4).clone()   # both query heads point at the e1 keys
    return keys.expand(b, 1, 16, 4).clone(), queries, torch.full((b, 1), 13)


def test_pick_reads_the_cluster_the_query_points_at_and_what_is_always_read():
    keys, queries, lengths = two_topics()
    method = SqueezedAttention(budget=8, sparsity=0, clusters=0.2, window=2)        # 2 clusters of 10 keys
    states = [{}]
    picks = method.pick(read_step(keys, queries, [12], lengths, states))
    assert picked(picks) == [[[5, 6, 7, 8, 9, 10, 11, 12]]]        # the e1 cluster, the window, the new token
    # the clustering read the 10 keys once; every step reads the 2 centroids (float32 here)
    assert picks.scored_bytes == 10 * 4 * 4 + 2 * 4 * 4
    again = method.pick(read_step(keys, queries, [12], lengths + 1, states))
    # one more token always read leaves the cluster no room: the budget holds
    assert picked(again) == [[[10, 11, 12, 13]]] and again.scored_bytes == 2 * 4 * 4
    # a budget the cluster no longer fits in: only what is always read
    small = SqueezedAttention(budget=7, sparsity=0, clusters=0.2, window=2)
    assert picked(small.pick(read_step(keys, queries, [12], lengths))) == [[[10, 11, 12]]]
    # room for both clusters: all of it; and what is always read is read past the budget
    roomy = SqueezedAttention(budget=13, sparsity=0, clusters=0.2, window=2)
    assert picked(roomy.pick(read_step(keys, queries, [12], lengths))) == [[list(range(13))]]
    tiny = SqueezedAttention(budget=1, sparsity=0, clusters=0.2, window=2)
    assert picked(tiny.pick(read_step(keys, queries, [12], lengths))) == [[[10, 11, 12]]]


def test_the_threshold_drops_a_cluster_the_budget_has_room_for(tmp_path):
    keys, queries, lengths = two_topics()
    est = cluster_estimates(queries.view(1, 1, 2, 4), *[t[None] for t in kmeans(keys[0, :, :10], 2)[::2]])
    high = float(est.max())                                      # the e1 cluster's estimate
    for top, want in ((2 * high * 0.99 / 0.5, [5, 6, 7, 8, 9, 10, 11, 12]), (2 * high * 1.01 / 0.5, [10, 11, 12])):
        method = SqueezedAttention(budget=100, sparsity=0.5, clusters=0.2, window=2)
        method.bind_calibration(json.loads(artifact(tmp_path / "a.json", "m", 1, 1, top / 2).read_text()))
        assert method.threshold(0) == pytest.approx(top / 4)
        assert picked(method.pick(read_step(keys, queries, [12], lengths))) == [[want]]


def test_sequences_of_a_batch_keep_their_own_context_and_clusters():
    keys, queries, lengths = two_topics(2)
    queries[1] = torch.eye(4)[0] * 3                            # the second points at the e0 keys
    method = SqueezedAttention(budget=8, sparsity=0, clusters=0.2, window=2)
    states = [{}, {}]
    picks = method.pick(read_step(keys, queries, [12, 12], lengths, states))
    assert picked(picks) == [[[5, 6, 7, 8, 9, 10, 11, 12]], [[0, 1, 2, 3, 4, 10, 11, 12]]]
    # a sequence whose context is all window clusters nothing: it reads everything it holds
    picks = method.pick(read_step(keys, queries, [12, 2], lengths, [{}, {}]))
    assert picked(picks)[1] == [list(range(13))] and 0 in states[0] and 0 in states[1]


def test_threshold_grid_interpolates_and_per_layer(tmp_path):
    method = SqueezedAttention(sparsity=0.705, per_layer=True)
    method.bind_calibration(json.loads(artifact(tmp_path / "a.json", "m", 2, 2, 1.0, [1.0, 2.0]).read_text()))
    assert method.threshold(0) == pytest.approx(0.705) and method.threshold(1) == pytest.approx(1.41)
    method.per_layer = False
    assert method.threshold(1) == pytest.approx(0.705)
    assert SqueezedAttention(sparsity=0).threshold(0) == float("-inf")
    with pytest.raises(ValueError, match="python -m nanokv.calibrate squeezed_attention"):
        SqueezedAttention().threshold(0)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity=1.0 of method 'squeezed_attention' must be a number in [0, 0.99]"),
    ({"sparsity": "lots"}, "sparsity='lots' of method 'squeezed_attention' must be float, a number in [0, 0.99]"),
    ({"clusters": 0}, "clusters=0.0 of method 'squeezed_attention' must be a number in (0, 1]"),
    ({"clusters": 1.5}, "clusters=1.5 of method 'squeezed_attention' must be a number in (0, 1]"),
    ({"window": -1}, "window=-1 of method 'squeezed_attention' must be an integer >= 0"),
    ({"skip_layers": -2}, "skip_layers=-2 of method 'squeezed_attention' must be an integer >= 0"),
    ({"budget": 0}, "budget must be a positive number of tokens, got 0"),
    ({"compression": 0.5}, "give --budget (tokens read per head and step, e.g. 256), not --compression=0.5"),
    ({"centroids": 3}, "unknown option 'centroids' for method 'squeezed_attention'; valid: sparsity, clusters"),
])
def test_bad_options_are_named_with_their_range(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SqueezedAttention(**options)


def test_defaults_and_what_needs_a_calibration():
    method = SqueezedAttention()
    assert (method.budget, method.sparsity, method.clusters, method.window, method.skip_layers) == (1024, 0.7, 0.05, 100, 0)
    assert method.calibration == "squeezed_attention" and not method.compresses
    assert SqueezedAttention(sparsity=0).calibration is None     # no threshold: nothing to load


def test_load_calibration_refuses_a_malformed_threshold_grid(tmp_path):
    from nanokv.artifacts import load_calibration

    good = artifact(tmp_path / "good.json", "smollm2-135m", 2, 3)
    assert len(load_calibration("squeezed_attention", "smollm2-135m", 2, 3, path=good)["thresholds"]) == 101
    bad = json.loads(good.read_text())
    bad["layer_thresholds"][1] = bad["layer_thresholds"][1][::-1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="101 finite nondecreasing numbers; run `python -m nanokv.calibrate "
                                         "squeezed_attention --model smollm2-135m --out"):
        load_calibration("squeezed_attention", "smollm2-135m", 2, 3, path=tmp_path / "bad.json")


# --- the engine ----------------------------------------------------------------------------------

class DenseSqueezed(DenseLayers):
    """Squeezed Attention stated plainly, as the model's attention callable: every layer keeps all
    its keys; at a layer's first decode step each kv-head's first `fixed` keys are clustered (the
    method's k-means, checked by hand above); each decode step, per kv-head, S_i = the mean over its
    query heads of exp(q.c_i / sqrt(D)) / sum_j N_j exp(q.c_j / sqrt(D)); clusters by S, highest
    first, kept while S > threshold and their sizes fit in budget - (held - fixed); attention over
    their keys and every key from `fixed` on."""

    def __init__(self, fixed, budget, threshold, clusters):
        super().__init__()
        self.fixed, self.budget, self.threshold, self.clusters = fixed, budget, threshold, clusters
        self.clustered = {}
        self.cut_by_budget = self.cut_by_threshold = 0

    def decode(self, layer, q, keys, values):
        n, H, D = keys.shape
        if layer not in self.clustered:
            self.clustered[layer] = kmeans(keys[:self.fixed].transpose(0, 1), max(1, int(self.clusters * self.fixed)))
        centroids, labels, sizes = self.clustered[layer]
        group, chosen = q.shape[1] // H, []
        for h in range(H):
            C = centroids.shape[1]
            heads = q[0, h * group:(h + 1) * group].float()
            est = []
            for i in range(C):
                shares = []
                for qg in heads:
                    e = [math.exp(float(qg @ centroids[h, j]) / math.sqrt(D)) for j in range(C)]
                    shares.append(e[i] / sum(int(sizes[h, j]) * e[j] for j in range(C)))
                est.append(sum(shares) / group if sizes[h, i] else float("-inf"))
            kept, used, room = set(), 0, self.budget - (n - self.fixed)
            for i in sorted(range(C), key=lambda i: -est[i]):
                if not est[i] > self.threshold:
                    self.cut_by_threshold += 1
                    break
                if used + int(sizes[h, i]) > room:
                    self.cut_by_budget += 1
                    break
                kept.add(i)
                used += int(sizes[h, i])
            chosen.append(torch.tensor([j for j in range(self.fixed) if int(labels[h, j]) in kept] +
                                       list(range(self.fixed, n))))
        return self.attend(q, keys, values, chosen)


@pytest.mark.parametrize("question", [0, 24])
def test_engine_matches_a_plain_statement_of_squeezed_attention(tiny_dir, tmp_path, question):
    """A plain prompt, and a (context, question) one whose question is read whole like what follows."""
    from nanokv import LLM, SamplingParams

    context, steps, window, budget = prompt(140), 12, 8, 48
    path = artifact(tmp_path / "sq.json", str(tiny_dir), top=0.02)
    llm = LLM(str(tiny_dir), dtype="float32", method="squeezed_attention", budget=budget, sparsity=0.5,
              clusters=0.25, window=window, calibration_file=str(path))
    ids = context + prompt(question, seed=2)
    request = (context, ids[len(context):]) if question else ids
    [out] = llm.generate([request], SamplingParams(max_tokens=steps, ignore_eos=True))
    reference = DenseSqueezed(len(context) - window, budget, 0.01, 0.25)
    assert out.token_ids == restated_greedy(llm.model, reference, ids, steps)
    assert reference.cut_by_threshold and reference.cut_by_budget   # both rules picked something out


def test_continuous_batching_a_roomy_budget_is_full_and_reads_fall_with_the_budget(tiny_dir):
    from nanokv import LLM, SamplingParams

    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [prompt(n, seed=n) for n in (40, 90, 130)]
    full = LLM(str(tiny_dir), dtype="float32")
    expected = [o.token_ids for o in full.generate(prompts, params)]
    read = {}
    for budget in (1000, 64, 24):
        llm = LLM(str(tiny_dir), dtype="float32", method="squeezed_attention", budget=budget, sparsity=0,
                  clusters=0.1, window=8)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        read[budget] = llm.stats["kv_bytes_read_per_decode_token"]
        if budget == 1000:  # every cluster fits: every held slot, in order, as full reads them
            assert got == expected
    assert read[1000] > read[64] > read[24]
    assert read[24] < 0.5 * full.stats["kv_bytes_read_per_decode_token"]


def test_a_preempted_sequence_clusters_its_context_again_the_same_way(tiny_dir, tmp_path, monkeypatch):
    """A recompute starts the reader's state afresh and clusters the context again: the same keys
    (the prompt's, recomputed as prefill) give the same clusters. (Its generated tokens are
    recomputed densely, as Quest's, so later tokens may differ from an unpreempted run.)"""
    from nanokv import LLM, SamplingParams
    from nanokv.methods import squeezed_attention

    made = []

    def recording(keys, C):
        made.append((keys.clone(), squeezed_attention.kmeans.__wrapped__(keys, C)))
        return made[-1][1]

    recording.__wrapped__ = squeezed_attention.kmeans
    monkeypatch.setattr(squeezed_attention, "kmeans", recording)
    path = artifact(tmp_path / "sq.json", str(tiny_dir), top=0.02)
    roomy = LLM(str(tiny_dir), dtype="float32", method="squeezed_attention", budget=40, sparsity=0.5, clusters=0.25,
                window=8, calibration_file=str(path))
    tight = LLM(str(tiny_dir), dtype="float32", method="squeezed_attention", budget=40, sparsity=0.5, clusters=0.25,
                window=8, calibration_file=str(path), kv_cache_memory=2 * 2 * 12 * roomy.cache.pool.bytes_per_block)
    tight.generate([prompt(n, seed=n) for n in (70, 100, 120)], SamplingParams(max_tokens=24, ignore_eos=True))
    assert tight.stats["preemptions"] > 0 and len(made) > 3 * 2      # some context was clustered twice
    for i, (keys, (centroids, labels, sizes)) in enumerate(made):
        first = next(j for j, (k, _) in enumerate(made) if k.shape == keys.shape and torch.allclose(k, keys, atol=1e-5))
        assert torch.equal(made[first][1][1], labels) and torch.equal(made[first][1][2], sizes)
        assert torch.allclose(made[first][1][0], centroids, atol=1e-5)


def test_calibration_command_restated_and_read_by_the_engine(tiny_dir, tmp_path, monkeypatch, capsys):
    from nanokv import LLM, SamplingParams
    from nanokv.calibrate import cli, model_key
    from nanokv.calibrate.dense import calibration_texts
    from nanokv.loading import load_model
    from nanokv.tokenizer import Tokenizer

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate squeezed_attention --model {tiny_dir}")):
        LLM(str(tiny_dir), dtype="float32", method="squeezed_attention")
    assert cli.main(["squeezed_attention", "--model", str(tiny_dir), "--samples", "2", "--length", "96",
                     "--window", "96", "--device", "cpu"]) == 2
    assert "--window must be in [1, 96) (below --length 96), got 96" in capsys.readouterr().err
    assert cli.main(["squeezed_attention", "--model", str(tiny_dir), "--samples", "2", "--length", "96",
                     "--window", "16", "--clusters", "0.1", "--device", "cpu"]) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / "squeezed_attention.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    made = json.loads(path.read_text())
    assert (made["settings"]["clusters"], made["settings"]["window"]) == (0.1, 16)
    # restated: each layer's keys of the first 80 tokens in 8 clusters; each key's S averaged over the
    # last 16 queries, written out per query head; the quantiles as numpy's default (linear)
    model, config = load_model("hf_dir", tiny_dir, torch.float32, pack=False)
    seen = {}

    class Capture:
        positions = torch.arange(96)

        def __call__(self, layer, q, k, v, sliding_window):
            seen.setdefault(layer, []).append((q, k))
            return attention_by_position(q, k, v, self.positions, self.positions)

    with torch.inference_mode():
        for ids in calibration_texts(Tokenizer.from_dir(tiny_dir), 2, 96, 0):
            model(torch.tensor(ids), torch.arange(96), Capture())
    per_layer = []
    for layer in range(2):
        values = []
        for q, k in seen[layer]:
            centroids, labels, sizes = kmeans(k[:80].transpose(0, 1), 8)
            for h in range(2):
                est = torch.zeros(8, dtype=torch.float64)
                for t in range(80, 96):
                    for qg in q[t, 2 * h:2 * h + 2].double():
                        e = (centroids[h].double() @ qg / math.sqrt(32)).exp()
                        est += e / (sizes[h] * e).sum() / 32
                values.append(est[labels[h]])
        per_layer.append(torch.cat(values))
    qs = torch.linspace(0, 1, 101, dtype=torch.float64)
    grid = lambda row: torch.tensor(row, dtype=torch.float64)  # noqa: E731
    assert torch.allclose(grid(made["thresholds"]), torch.quantile(torch.cat(per_layer), qs), rtol=1e-4)
    for layer in range(2):
        assert torch.allclose(grid(made["layer_thresholds"][layer]), torch.quantile(per_layer[layer], qs), rtol=1e-4)
    llm = LLM(str(tiny_dir), dtype="float32", method="squeezed_attention", budget=64, clusters=0.1, window=16)
    assert llm.method.threshold(0) == pytest.approx(made["thresholds"][70])
    [out] = llm.generate([prompt(120)], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


@pytest.mark.slow
def test_real_weights_calibrated_engine_matches_the_plain_statement(smollm2_gguf, tmp_path):
    """SmolLM2 (9 query heads over 3 kv-heads): its own calibration (2 texts), then the engine at the
    default sparsity against the restatement, both rules cutting; the reads fall below full's."""
    from nanokv import LLM, SamplingParams
    from nanokv.calibrate.cli import calibrate

    path = calibrate("squeezed_attention", str(smollm2_gguf), samples=2, length=512, out=tmp_path / "sq.json",
                     device="cpu", quiet=True, window=32)
    context, steps, budget = list(range(1000, 1300)), 16, 160
    llm = LLM(str(smollm2_gguf), dtype="float32", method="squeezed_attention", budget=budget, window=32,
              calibration_file=str(path))
    [out] = llm.generate([context], SamplingParams(max_tokens=steps, ignore_eos=True))
    reference = DenseSqueezed(len(context) - 32, budget, llm.method.threshold(0), 0.05)
    assert out.token_ids == restated_greedy(llm.model, reference, context, steps)
    assert reference.cut_by_threshold and reference.cut_by_budget
    full = LLM(str(smollm2_gguf), dtype="float32")
    full.generate([context], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert llm.stats["kv_bytes_read_per_decode_token"] < 0.6 * full.stats["kv_bytes_read_per_decode_token"]
