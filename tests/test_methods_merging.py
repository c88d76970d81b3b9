"""Merging methods: CaM, D2O and KVMerger fold what they evict into what they keep. Each core
operation on hand-built inputs whose answer is computed here by hand, then in the engine: mixed
prompt lengths under continuous batching holding the budget's bytes, and for the decode-time
ones (CaM, D2O) a plain restatement of the method and a preemption/recompute that changes
nothing."""

import math

import pytest
import torch

from helpers import generate_holding, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.d2o import WHOLE
from nanokv.methods.base import DecodeStep, PrefillView, hashed_uniform
from test_methods_decode_wave2 import TINY_PROMPTS, serve

inf = float("inf")


def prefill_view(keys, column_sums, values=None, layer=3, num_layers=30, state=None):
    H, S, D = keys.shape
    view = PrefillView(layer, num_layers, torch.zeros(S, H, D), keys, torch.arange(S), column_sums,
                       {} if state is None else state)
    view.values = torch.randn(H, S, D) if values is None else values
    return view


def one_head_step(positions, q_pos, budget, keys=None, values=None, visible=None, layer=3):
    """A DecodeStep for one sequence with one kv-head whose slots hold `positions` (any order)."""
    k_pos = torch.tensor(positions).view(1, 1, -1)
    if visible is None:
        visible = k_pos <= q_pos
    return DecodeStep(layer, torch.tensor([q_pos]), torch.tensor([q_pos]), k_pos, visible, torch.tensor([budget]),
                      keys, values)


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


# --- the shared draw ----------------------------------------------------------------------

def test_merge_draws_are_a_uniform_hash_of_seed_layer_head_and_position():
    u = hashed_uniform(0, 3, torch.arange(4)[:, None], torch.arange(5000)[None, :])
    assert torch.equal(u, hashed_uniform(0, 3, torch.arange(4)[:, None], torch.arange(5000)[None, :]))
    assert not torch.equal(u, hashed_uniform(1, 3, torch.arange(4)[:, None], torch.arange(5000)[None, :]))
    assert ((u > 0) & (u < 1)).all()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert abs(float((u < 0.3).float().mean()) - 0.3) < 0.01


# --- CaM ----------------------------------------------------------------------------------

def test_cam_keeps_the_start_and_the_newest_and_evicts_the_oldest_after_the_start():
    method = make_method("cam", budget=6, start_ratio=0.5)                  # 3 start + 3 newest
    view = prefill_view(torch.randn(2, 10, 4), torch.rand(2, 10))
    assert kept(method.keep_mask(view)) == [[0, 1, 2, 7, 8, 9]] * 2
    # decode: slots hold positions in any order; the victim is the oldest past the 3 start ones
    st = one_head_step([9, 0, 4, 2, 1, 7, 10], 10, 6)
    scores, state = method.decode_scores(torch.zeros(1, 1, 1, 7), {"cam_attention": torch.zeros(1, 1, 7)}, st)
    assert int(scores.argmin()) == 2 and scores[0, 0, [1, 3, 4]].eq(inf).all()


def test_cam_expected_merged_value_is_p_times_the_value_over_m():
    # victim at position 2; the held tokens after it are 3, 4, 5 and 8 (7 is not seen: a replay's
    # later token); with m = 3 the targets are 3, 4, 5. A: victim 0.3, targets 0.2, 0.4, 0.6, so
    # p = 0.3 / 0.4 = 0.75 and each target gains 0.75 v / 3 on average; keys and others unchanged.
    positions = [5, 0, 2, 8, 3, 7, 4]
    visible = torch.tensor([[[True, True, True, True, True, False, True]]])
    attention = torch.tensor([[[0.6, 0.9, 0.3, 0.1, 0.2, 0.5, 0.4]]])
    torch.manual_seed(0)
    values = torch.randn(1, 1, 7, 4)
    st = one_head_step(positions, 8, 6, values=values, visible=visible)
    victim, evicting = torch.tensor([[2]]), torch.tensor([[True]])
    p = 0.3 / ((0.2 + 0.4 + 0.6) / 3)
    draws, total = 0, torch.zeros(7, 4)
    for seed in range(4000):
        merged = make_method("cam", budget=6, merge_budget=3, seed=seed).merge_evicted(
            victim, evicting, {"cam_attention": attention}, st)
        assert set(merged) == {"v"}
        added = merged["v"][0, 0] - values[0, 0]
        draws += bool(added.abs().sum() > 0)
        total += added
    assert abs(draws / 4000 - p) < 0.025
    mean = total / 4000
    for slot in (0, 4, 6):                                                  # positions 5, 3, 4
        torch.testing.assert_close(mean[slot], p * values[0, 0, 2] / 3, atol=0.02, rtol=0)
    assert mean[[1, 2, 3, 5]].abs().max() == 0                              # 0, the victim, 8, 7: untouched
    # a victim with more attention than its targets always merges (p clamps to 1); with only two
    # tokens after it, each gets v / 2
    st = one_head_step([0, 1, 2], 2, 2, values=values[..., :3, :])
    merged = make_method("cam", budget=2, merge_budget=3).merge_evicted(
        torch.tensor([[0]]), evicting, {"cam_attention": torch.tensor([[[5.0, 1.0, 0.0]]])}, st)["v"]
    torch.testing.assert_close(merged[0, 0, 1:], values[0, 0, 1:3] + values[0, 0, 0] / 2)
    # a head that does not evict, or a victim nobody attended to (p = 0), merges nothing
    for attention_, evicting_ in ((torch.tensor([[[5.0, 1.0, 0.0]]]), torch.tensor([[False]])),
                                  (torch.tensor([[[0.0, 1.0, 0.0]]]), evicting)):
        merged = make_method("cam", budget=2).merge_evicted(torch.tensor([[0]]), evicting_,
                                                            {"cam_attention": attention_}, st)["v"]
        assert torch.equal(merged, values[..., :3, :])


def test_cam_prefill_merges_oldest_first_and_carries_merged_values_on():
    # keep 0 (start), 3, 4, 5; tokens 1 and 2 go, each into its next m = 2 prompt tokens, p = 1
    # (A_1 = 1 against (1 + .5) / 2, A_2 = 1 against .5): v2' = v2 + v1 / 2, v3' = v3 + v1 / 2 + v2' / 2,
    # v4' = v4 + v2' / 2
    values = torch.randn(1, 6, 4)
    keep = torch.tensor([[True, False, False, True, True, True]])
    view = prefill_view(torch.randn(1, 6, 4), torch.tensor([[5.0, 1.0, 1.0, 0.5, 0.5, 0.5]]), values)
    v = values[0]
    merged = make_method("cam", budget=4, merge_budget=2).merge(view, keep)["v"][0]
    v2 = v[2] + v[1] / 2
    torch.testing.assert_close(merged[[0, 3, 4, 5]], torch.stack([v[0], v[3] + v[1] / 2 + v2 / 2, v[4] + v2 / 2, v[5]]))
    # token 1 drew no attention (p = 0): only token 2 merges
    view.column_sums = torch.tensor([[5.0, 0.0, 1.0, 0.5, 0.5, 0.5]])
    merged = make_method("cam", budget=4, merge_budget=2).merge(view, keep)["v"][0]
    torch.testing.assert_close(merged[[0, 3, 4, 5]], torch.stack([v[0], v[3] + v[2] / 2, v[4] + v[2] / 2, v[5]]))


# --- D2O ----------------------------------------------------------------------------------

def test_d2o_layer_budgets_follow_the_density_of_each_layer_seen_so_far():
    # three kv-heads with column sums c x [0]*10 + [1]*10: variances proportional to c^2, min-max
    # normalised over the heads: c = 0, 1, 2 -> 0, 1/4, 1, mean 5/12; c = 0, sqrt 3, 2 -> 7/12
    def sums(cs):
        return torch.stack([c * torch.tensor([0.0] * 10 + [1.0] * 10) for c in cs])

    method = make_method("d2o", compression=0.5)                          # B = 10 of 20
    state, w = {}, []
    for layer, (cs, v) in enumerate([((0, 1, 2), 5 / 12), ((0, math.sqrt(3), 2), 7 / 12), ((0, 1, 2), 5 / 12)]):
        view = prefill_view(torch.randn(3, 20, 4), sums(cs), layer=layer, state=state)
        w.append(math.exp(-v))
        expected = int(10 * len(w) * w[-1] / sum(w))
        assert int(method.prefill_state(view)["d2o_budget"][0, 0]) == expected
        assert method.kept_after_prefill(20, layer, 30) >= expected
    assert [int(10 * (i + 1) * w[i] / sum(w[:i + 1])) for i in range(3)] == [10, 9, 10]


def test_d2o_official_allocation_is_a_softmax_over_all_layers_with_0_1_and_the_last_whole():
    # 5 layers, B = 10 of 20; v = 0.5 in layers 2 and 3, 0 elsewhere: w = e^-v / (3 + 2 e^-0.5)
    method = make_method("d2o", compression=0.5, allocation="official")
    w_low = math.exp(-0.5) / (3 + 2 * math.exp(-0.5))
    want = int(5 * w_low * 10)                                             # 5 x 0.1440 x 10 = 7
    assert method.official_budgets([0.0, 0.0, 0.5, 0.5, 0.0], 20) == [WHOLE, WHOLE, want, want, WHOLE] == \
        [WHOLE, WHOLE, 7, 7, WHOLE]
    # clamped to [0.01, 1] of the prompt: a dense layer among sparse ones keeps at least 1 of 100
    assert method.official_budgets([0.0, 0.0, 40.0, 0.0, 0.0], 100)[2] == 1
    assert method.trims_earlier_layers and not make_method("d2o", compression=0.5).trims_earlier_layers
    assert method.kept_after_prefill(20, 2, 5) == 20                       # whole until the last layer


def test_d2o_official_allocation_compresses_and_merges_the_middle_layers_at_the_last_ones_prefill():
    torch.manual_seed(0)
    L, H, S = 5, 2, 20
    method = make_method("d2o", compression=0.5, allocation="official", sink_tokens=1)
    state, views = {}, []
    for layer in range(L):
        sums = torch.rand(H, S) * (1 + layer)
        view = prefill_view(torch.randn(H, S, 4), sums, layer=layer, num_layers=L, state=state)
        views.append(view)
        fields = method.state_of(view)
        assert (fields["d2o_budget"] == WHOLE).all() and method.keep_mask(view) is None
        masks = method.earlier_keep_masks(view)
        if layer < L - 1:
            assert masks == {} and method.earlier_prefill_state(view) == {}
    budgets = method.official_budgets([method.density(v.column_sums) for v in views], S)
    assert sorted(masks) == [2, 3] and all(b < S for b in budgets[2:4])
    written = method.earlier_prefill_state(view)
    assert sorted(written) == [0, 1, 2, 3]
    for layer in (2, 3):
        v, keep, budget = views[layer], masks[layer], budgets[layer]
        assert (keep.sum(-1) == budget).all()
        # what `keep_mask` keeps at that budget (sinks, recent share, heaviest), merged as `merge` does
        top = method.protect(v.column_sums.clone(), v.positions, v.positions[-1], budget).topk(budget, dim=-1)
        assert (keep.gather(1, top.indices)).all()
        merged = method.merge(v, keep)
        assert torch.equal(written[layer]["k"], merged["k"][keep].view(H, budget, 4))
        assert (written[layer]["d2o_budget"] == budget).all()
    assert (written[0]["d2o_budget"] == WHOLE).all() and "k" not in written[0]  # layers 0, 1: whole


def test_d2o_official_allocation_in_the_engine_holds_middle_layers_at_budget_and_recomputes_alike(tiny_deep):
    method = make_method("d2o", budget=8, allocation="official")
    prompts = [p * 3 for p in TINY_PROMPTS]                                # 6 to 60 tokens
    roomy, held, preemptions, cache = serve(tiny_deep, method, prompts, 1000, 12)
    assert preemptions == 0 and cache.pool.num_free == cache.pool.usable_blocks
    for (lengths, blocks), prompt in zip(held, prompts):
        cached = len(prompt) + 11
        if len(prompt) <= 8:                                               # within budget: B everywhere
            assert (lengths == min(8, cached)).all()
            continue
        assert (lengths[[0, 1, 4]] == cached).all()                        # never compressed
        middle = lengths[2:4]
        assert (middle == middle[:, :1]).all() and (middle < cached).all()
    tight, tight_held, tight_preemptions, _ = serve(tiny_deep, method, prompts, 260, 12)
    assert tight_preemptions > 0 and tight == roomy
    assert all(torch.equal(a[0], b[0]) for a, b in zip(tight_held, held))


def test_d2o_prefill_merges_each_evicted_key_into_its_most_similar_kept_one_above_the_mean():
    # kept 0, 3, 5: (1, 0), (0, 1), (1, 1). Evicted 1 (2, 0): cosine 1 with 0; 2 (0, 3): 1 with 3;
    # 4 (1, -1): 0.707 with 0 (0 with 5, -0.707 with 3). Threshold: their mean, 0.902: 1 and 2 merge,
    # 4 does not. k0 <- (k0 + 1 k1) / 2, k3 <- (k3 + 1 k2) / 2; the same weights for v
    keys = torch.tensor([[[1.0, 0], [2, 0], [0, 3], [0, 1], [1, -1], [1, 1]]])
    values = torch.randn(1, 6, 3)
    keep = torch.tensor([[True, False, False, True, False, True]])
    merged = make_method("d2o", budget=3).merge(prefill_view(keys, torch.rand(1, 6), values), keep)
    torch.testing.assert_close(merged["k"][0, [0, 3, 5]], torch.tensor([[1.5, 0], [0, 2], [1, 1]]))
    v = values[0]
    torch.testing.assert_close(merged["v"][0, [0, 3, 5]], torch.stack([(v[0] + v[1]) / 2, (v[3] + v[2]) / 2, v[5]]))
    torch.testing.assert_close(merged["d2o_threshold"][0], torch.full((6,), (1 + 1 + 0.5 ** 0.5) / 3))
    # tokens 1 (2, 0) and 2 (3, 0.3) both nearest to kept 0 (1, 0): cosines 1 and 0.995, threshold
    # their mean 0.9975, so only 1 merges; with 2 = (2, 0) too both do: (k0 + k1 + k2) / 3
    keys2 = torch.tensor([[[1.0, 0], [2, 0], [3, 0.3], [0, 1]]])
    keep2 = torch.tensor([[True, False, False, True]])
    merged = make_method("d2o", budget=2).merge(prefill_view(keys2, torch.rand(1, 4), torch.zeros(1, 4, 2)), keep2)
    torch.testing.assert_close(merged["k"][0, 0], torch.tensor([1.5, 0.0]))
    keys2[0, 2] = torch.tensor([2.0, 0])
    merged = make_method("d2o", budget=2).merge(prefill_view(keys2, torch.rand(1, 4), torch.zeros(1, 4, 2)), keep2)
    torch.testing.assert_close(merged["k"][0, 0], torch.tensor([(1 + 2 + 2) / 3, 0.0]))


def test_d2o_decode_threshold_is_an_ema_of_the_max_similarities():
    # the victim (slot 1) has key (0.8, 0.6): cosine 0.8 with slot 0 (1, 0), -0.6 with slot 2 (0, -1)
    keys = torch.tensor([[[[1.0, 0], [0.8, 0.6], [0, -1], [0.5, 0.5]]]])
    values = torch.randn(1, 1, 4, 3)
    st = one_head_step([0, 1, 2, 3], 3, 3, keys=keys, values=values)
    st.visible[0, 0, 3] = False                                            # not seen: no target
    victim, evicting = torch.tensor([[1]]), torch.tensor([[True]])

    def merged_after(previous, **options):
        state = {"d2o_threshold": torch.full((1, 1, 4), previous)}
        return make_method("d2o", budget=3, **options).merge_evicted(victim, evicting, state, st)

    first = merged_after(float("nan"))                                      # the first eviction: T = s = 0.8
    torch.testing.assert_close(first["d2o_threshold"], torch.full((1, 1, 4), 0.8))
    torch.testing.assert_close(first["k"][0, 0, 0], (keys[0, 0, 0] + 0.8 * keys[0, 0, 1]) / 2)
    torch.testing.assert_close(first["v"][0, 0, 0], (values[0, 0, 0] + 0.8 * values[0, 0, 1]) / 2)
    assert torch.equal(first["k"][0, 0, 1:], keys[0, 0, 1:]) and torch.equal(first["v"][0, 0, 1:], values[0, 0, 1:])
    high = merged_after(0.9)                                                # T = 0.5 x 0.9 + 0.5 x 0.8 = 0.85 > 0.8
    torch.testing.assert_close(high["d2o_threshold"], torch.full((1, 1, 4), 0.85))
    assert torch.equal(high["k"], keys) and torch.equal(high["v"], values)
    low = merged_after(0.5)                                                 # T = 0.65: merges
    torch.testing.assert_close(low["d2o_threshold"], torch.full((1, 1, 4), 0.65))
    torch.testing.assert_close(low["k"][0, 0, 0], (keys[0, 0, 0] + 0.8 * keys[0, 0, 1]) / 2)
    weighted = merged_after(0.9, alpha=0.2, beta=0.8)                      # T = 0.18 + 0.64 = 0.82
    torch.testing.assert_close(weighted["d2o_threshold"], torch.full((1, 1, 4), 0.82))
    assert torch.equal(weighted["k"], keys)


def test_d2o_decode_holds_each_layer_at_its_own_budget_and_protects_sinks_and_recent():
    method = make_method("d2o", budget=8, sink_tokens=2, recent_ratio=0.5)
    st = one_head_step(list(range(10)), 9, 8)
    state = {"d2o_score": torch.arange(10.0).flip(0).view(1, 1, 10), "d2o_threshold": torch.zeros(1, 1, 10),
             "d2o_budget": torch.tensor([[[6, 6, 6, 6, 6, 6, 6, 6, 6, 0]]], dtype=torch.int32)}  # the new token: 0
    scores, new = method.decode_scores(torch.zeros(1, 1, 1, 10), state, st)
    assert new["d2o_budget"].eq(6).all()                                    # carried to the new token's slot
    assert int(method.decode_budgets(new, st)) == 6
    # sinks 0, 1 and the newest 3 (of 6) protected; the lowest score left is position 6
    assert scores[0, 0, [0, 1, 7, 8, 9]].eq(inf).all() and int(scores.argmin()) == 6


# --- KVMerger -----------------------------------------------------------------------------

KV_KEYS = torch.tensor([[[1.0, 0], [2, 0.2], [1, 0.1], [0, 1], [0, 2], [1, 1], [-1, 0], [-1, 0.1], [0.5, 0], [0, 0.5]]])
KV_SUMS = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.05, 0.8, 0.0, 0.1, 0.0, 0.0]])


def test_kvmerger_merging_sets_are_runs_of_similar_neighbours_outside_the_recent_window():
    method = make_method("kvmerger", budget=4)                              # 2 recent + 2 heavy
    # adjacent cosines: 0-1 .995, 1-2 1.0, 2-3 .0995, 3-4 1, 4-5 .707, 5-6 -.707, 6-7 .995: runs
    # {0, 1, 2} {3, 4} {5} {6, 7}; 8 and 9 are the recent window, sets of one
    assert method.merging_sets(KV_KEYS, 2).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 4, 5]]
    assert make_method("kvmerger", budget=4, threshold=0.7).merging_sets(KV_KEYS, 2).tolist() == \
        [[0, 0, 0, 1, 1, 1, 2, 2, 3, 4]]                                    # 4-5 (.707) joins too
    assert method.merging_sets(KV_KEYS, 0).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 4, 5]]  # 7-8: -.995, 8-9: 0


def test_kvmerger_keeps_heavy_and_recent_and_merges_each_set_into_its_kept_pivot_with_gaussian_weights():
    # keep: recent 8, 9 and the two highest sums, 1 (0.9) and 5 (0.8). Set {0, 1, 2} merges 0 and 2
    # into its pivot 1; {3, 4} and {6, 7} keep nothing and go whole; 5 is alone
    values = torch.randn(1, 10, 3)
    view = prefill_view(KV_KEYS, KV_SUMS, values)
    method = make_method("kvmerger", budget=4, sigma=1.0)
    keep = method.keep_mask(view)
    assert kept(keep) == [[1, 5, 8, 9]]
    merged = method.merge(view, keep)
    d0, d2 = 1.0 + 0.2 ** 2, 1.0 + 0.1 ** 2                                 # |k0 - k1|^2, |k2 - k1|^2
    for sigma2, merged_ in ((1.0, merged), ((d0 + d2) / 2, make_method("kvmerger", budget=4).merge(view, keep))):
        w0, w2 = math.exp(-d0 / (2 * sigma2)), math.exp(-d2 / (2 * sigma2))
        for name, x in (("k", KV_KEYS[0]), ("v", values[0])):
            torch.testing.assert_close(merged_[name][0, 1], (x[1] + w0 * x[0] + w2 * x[2]) / (1 + w0 + w2))
            assert torch.equal(merged_[name][0, [5, 8, 9]], x[[5, 8, 9]])
    assert make_method("kvmerger", budget=10).keep_mask(view) is None      # within budget: nothing to do


# --- in the engine ------------------------------------------------------------------------

PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((180, 95, 240, 130))]


@pytest.mark.parametrize("kind", ["cam", "d2o", "kvmerger"])
@pytest.mark.slow
def test_mixed_prompts_in_continuous_batching_hold_the_budgets_tokens(smollm2_gguf, kind):
    from nanokv import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), dtype="float32", method=kind, compression=0.5)
    held, finish = {}, llm.scheduler.finish

    def capture(seq):
        held[seq.id] = llm.cache.seqs[seq.id].lengths.clone()
        finish(seq)

    llm.scheduler.finish = capture
    steps = 6
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=steps, ignore_eos=True))
    per_block = llm.cache.pool.bytes_per_block
    for prompt, out, lengths in zip(PROMPTS, outs, (held[i] for i in sorted(held))):
        budget = math.ceil(len(prompt) / 2)
        assert out.metrics["kv_cache_bytes"] < out.metrics["kv_cache_bytes_uncompressed"]
        if kind == "cam":                                  # decode-time: every head holds the budget
            assert (lengths == budget).all()
        elif kind == "kvmerger":                           # prefill-time: the budget plus what followed
            assert (lengths == budget + steps - 1).all()
        else:                                              # a budget per layer, near the request's in all
            assert (lengths == lengths[:, :1]).all() and abs(float(lengths.float().mean()) / budget - 1) < 0.1
        assert out.metrics["kv_cache_bytes"] == int(llm.cache.blocks_for(lengths).sum()) * per_block


class PlainMerging:
    """CaM or D2O stated plainly for one sequence, as the model's attention: per (layer, kv-head) a
    list of dicts (position, k, v, accumulated attention a) in arrival order; eviction by list
    removal, merges by adding to the dicts. Independent of nanokv's cache, kernels and methods,
    except hashed_uniform, the definition of CaM's random numbers."""

    def __init__(self, kind, budget, options):
        self.kind, self.budget, self.o = kind, budget, options
        self.heads, self.positions, self.weights, self.layer_budget, self.threshold = {}, None, [], {}, {}

    def __call__(self, layer, q, k, v, sliding_window):
        T, Hq, D = q.shape
        H = k.shape[1]
        group = Hq // H
        heads = self.heads.setdefault(layer, [[] for _ in range(H)])
        for h in range(H):
            heads[h] += [dict(pos=int(p), k=k[t, h].clone(), v=v[t, h].clone(), a=0.0)
                         for t, p in enumerate(self.positions)]
        out, probs = torch.empty_like(q), []
        for h in range(H):
            keys = torch.stack([e["k"] for e in heads[h]])
            values = torch.stack([e["v"] for e in heads[h]])
            key_pos = torch.tensor([e["pos"] for e in heads[h]])
            z = q[:, h * group:(h + 1) * group].transpose(0, 1) @ keys.T / math.sqrt(D)  # [group, T, S]
            z[:, key_pos[None, :] > self.positions[:, None]] = float("-inf")
            p = z.softmax(-1)
            out[:, h * group:(h + 1) * group] = (p @ values).transpose(0, 1)
            probs.append(p)
        for h, entries in enumerate(heads):
            for e, a in zip(entries, probs[h].sum(1).mean(0).tolist()):
                e["a"] += a
        if T > 1:
            getattr(self, f"{self.kind}_prefill")(layer, heads)
        else:
            for h, entries in enumerate(heads):
                getattr(self, f"{self.kind}_decode")(layer, h, entries)
        return out

    # CaM: start + newest; the evicted value into the next m tokens with probability p
    def cam_merge(self, layer, h, entries, i, later):
        e = entries[i]
        if not later:
            return
        mean = sum(t["a"] for t in later) / len(later)
        p = 0.0 if e["a"] == 0 and mean == 0 else (1.0 if mean == 0 else min(1.0, max(0.0, e["a"] / mean)))
        if float(hashed_uniform(self.o.get("seed", 0), layer, h, e["pos"])) < p:
            for t in later:
                t["v"] = t["v"] + e["v"] / len(later)

    def cam_prefill(self, layer, heads):
        n, B, m = len(heads[0]), self.budget, self.o.get("merge_budget", 32)
        if n <= B:
            return
        start = int(B * self.o.get("start_ratio", 0.5))
        for h, entries in enumerate(heads):
            gone = [i for i in range(n) if entries[i]["pos"] >= start and i < n - (B - start)]
            for i in gone:
                self.cam_merge(layer, h, entries, i, entries[i + 1:i + 1 + m])
            heads[h][:] = [e for i, e in enumerate(entries) if i not in gone]

    def cam_decode(self, layer, h, entries):
        if len(entries) <= self.budget:
            return
        start = int(self.budget * self.o.get("start_ratio", 0.5))
        victim = min((e for e in entries if e["pos"] >= start), key=lambda e: e["pos"])
        later = sorted((e for e in entries if e["pos"] > victim["pos"]), key=lambda e: e["pos"])
        self.cam_merge(layer, h, entries, entries.index(victim), later[:self.o.get("merge_budget", 32)])
        entries.remove(victim)

    # D2O: layer budgets from density, heavy + recent + sinks, merge into the most similar kept key
    def protected(self, e, budget, newest):
        recent = int(budget * self.o.get("recent_ratio", 0.5))
        return e["pos"] < self.o.get("sink_tokens", 4) or e["pos"] > newest - recent

    def d2o_prefill(self, layer, heads):
        n = len(heads[0])
        if self.budget >= n:
            self.layer_budget[layer] = self.budget
            return
        variances = torch.tensor([torch.tensor([e["a"] for e in entries]).var().item() for entries in heads])
        normalised = (variances - variances.min()) / (variances.max() - variances.min() + 1e-6)
        self.weights.append(math.exp(-float(normalised.mean())))
        budget = min(n, int(self.budget * len(self.weights) * self.weights[-1] / sum(self.weights)))
        self.layer_budget[layer] = budget
        for h, entries in enumerate(heads):
            ranked = sorted(range(n), key=lambda i: (not self.protected(entries[i], budget, n - 1), -entries[i]["a"]))
            keep = sorted(ranked[:budget])
            gone = [i for i in range(n) if i not in keep]
            best = {}                                       # evicted i -> (cosine, the first most similar kept j)
            for i in gone:
                s, j = max((self.cosine(entries[i], entries[j]), -j) for j in keep)
                best[i] = (s, -j)
            threshold = sum(s for s, _ in best.values()) / len(gone)
            self.threshold[layer, h] = threshold
            into = {j: [] for j in keep}
            for i, (s, j) in best.items():
                if s >= threshold:
                    into[j].append((s, entries[i]))
            for j, merged in into.items():
                if merged:
                    for name in ("k", "v"):
                        entries[j][name] = (entries[j][name] + sum(s * e[name] for s, e in merged)) / (1 + len(merged))
            heads[h][:] = [entries[i] for i in keep]

    @staticmethod
    def cosine(a, b):
        return float(torch.dot(a["k"], b["k"]) / (a["k"].norm() * b["k"].norm()))

    def d2o_decode(self, layer, h, entries):
        budget, now = self.layer_budget[layer], int(self.positions[-1])
        if len(entries) <= budget:
            return
        candidates = [e for e in entries if not self.protected(e, budget, now)]
        victim = min(candidates, key=lambda e: (e["a"], e["pos"]))
        others = [e for e in entries if e is not victim]
        s, first = max((self.cosine(victim, e), -i) for i, e in enumerate(others))
        target = others[-first]                             # the first most similar
        previous = self.threshold.get((layer, h))
        threshold = s if previous is None else self.o.get("alpha", 0.5) * previous + self.o.get("beta", 0.5) * s
        self.threshold[layer, h] = threshold
        if s >= threshold:
            for name in ("k", "v"):
                target[name] = (target[name] + s * victim[name]) / 2
        entries.remove(victim)


PROMPT = [100 + (j * 13) % 5000 for j in range(48)]
DECODE_CASES = {"cam": dict(merge_budget=4, seed=5), "d2o": dict(sink_tokens=2)}


@pytest.mark.parametrize("kind", list(DECODE_CASES))
@pytest.mark.slow
def test_decode_time_merging_matches_a_plain_statement_of_the_method(smollm2_gguf, kind):
    """Greedy tokens and the positions every (layer, head) holds at the end, through the engine
    (paged cache, slot fields, merges written into the pool, swap-into-victim eviction) and
    through PlainMerging."""
    from nanokv import LLM

    budget, steps, options = 24, 10, DECODE_CASES[kind]
    llm = LLM(str(smollm2_gguf), dtype="float32", method=kind, budget=budget, **options)
    tokens_out, held = generate_holding(llm, PROMPT, steps)

    reference = PlainMerging(kind, budget, options)
    tokens = restated_greedy(llm.model, reference, PROMPT, steps)
    expected = [sorted(e["pos"] for e in entries) for layer in sorted(reference.heads)
                for entries in reference.heads[layer]]
    assert tokens_out == tokens
    assert [len(h) for h in held] == [len(h) for h in expected]
    assert held == expected


@pytest.mark.parametrize("kind", ["cam", "d2o", "kvmerger"])
def test_preemption_and_recompute_change_nothing(tiny, kind):
    """With too few blocks sequences are preempted and recomputed (their generated tokens replay
    their evictions and merges, the same draws): every output is as with room to spare, each head
    ends at its budget and the pool gets every block back."""
    method = make_method(kind, budget=12, **({"merge_budget": 4} if kind == "cam" else {}))
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    assert preemptions == 0
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0
    assert tight == roomy
    for (lengths, blocks), prompt in zip(held, TINY_PROMPTS):
        if kind == "kvmerger":
            assert (lengths == min(12, len(prompt)) + 19).all()
        elif kind == "cam" or len(prompt) <= 12:
            assert (lengths == 12).all() and (blocks == 3).all()
        else:
            assert (lengths == lengths[:, :1]).all()                        # D2O: one budget per layer
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="cam", start_ratio=1.0), r"start_ratio=1.0 .* in \[0, 1\)"),
    (dict(name="cam", merge_budget=0), "merge_budget=0 .* integer >= 1"),
    (dict(name="d2o", alpha=1.5), r"alpha=1.5 .* in \[0, 1\]"),
    (dict(name="kvmerger", threshold=2.0), r"threshold=2.0 .* in \[-1, 1\]"),
    (dict(name="cam+kivi"), "cam evicts during decode"),
])
def test_bad_settings_name_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(**kwargs)
