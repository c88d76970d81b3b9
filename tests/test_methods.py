"""Compression methods: keep-sets on hand-built inputs where the answer is known, option and
budget checking, and real bytes freed in the engine."""

import math
from functools import partial

import pytest
import torch

from helpers import generate_holding, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from tests.helpers import assert_preemption_repeats


def view(keys, queries=None, layer=5):
    H, S, D = keys.shape
    if queries is None:
        queries = torch.zeros(S, H, D)
    return PrefillView(layer, 30, queries, keys, torch.arange(S))


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_budget_arithmetic():
    assert make_method("knorm", compression=0.5).tokens_to_keep(9) == 5      # ceil((1 - 0.5) * 9)
    assert make_method("knorm", compression=0.75).tokens_to_keep(100) == 25
    # (1 - 0.7) * 10 is 3.0000000000000004 in floats: 3 are kept, as by every reference, not 4
    assert make_method("knorm", compression=0.7).tokens_to_keep(10) == 3
    assert make_method("h2o", compression=0.7).decode_budget(10) == 3
    assert [make_method("knorm", compression=r).tokens_to_keep(n) for r, n in ((0.9, 30), (0.3, 10), (0.1, 1000))] \
        == [3, 7, 900]
    assert make_method("knorm", budget=64).tokens_to_keep(40) == 40          # never more than there is
    assert make_method("full").compresses is False
    assert make_method("knorm").compresses is False                          # no budget given: nothing to do
    assert make_method("pyramidkv", compression=0.5, beta=10).beta == 10.0   # an int where a float is asked


def test_streaming_llm_keeps_sinks_and_recent():
    mask = make_method("streaming_llm", budget=8).keep_mask(view(torch.randn(2, 20, 4)))
    assert kept(mask) == [[0, 1, 2, 3, 16, 17, 18, 19]] * 2


def test_knorm_keeps_lowest_norms_per_head():
    norms = torch.tensor([[5., 1., 4., 2., 3., 6.], [1., 2., 3., 4., 5., 6.]])
    keys = torch.zeros(2, 6, 3)
    keys[..., 0] = norms  # one non-zero channel: the norm is that value
    mask = make_method("knorm", budget=3).keep_mask(view(keys))
    assert kept(mask) == [[1, 3, 4], [0, 1, 2]]
    assert make_method("knorm", budget=3).keep_mask(view(keys, layer=1)) is None  # paper: layers 0-1 whole
    assert make_method("knorm", budget=3, skip_layers=0).keep_mask(view(keys, layer=1)) is not None


def test_snapkv_keeps_what_the_window_attends_to():
    # one kv-head, two query heads (GQA). Keys 3 and 7 point along the queries' direction;
    # all others are orthogonal to it. The last 2 tokens are the observation window.
    S, D = 12, 4
    keys = torch.zeros(1, S, D)
    keys[0, :, 1] = 1.0
    keys[0, 3] = torch.tensor([8.0, 0, 0, 0])
    keys[0, 7] = torch.tensor([6.0, 0, 0, 0])
    queries = torch.zeros(S, 2, D)
    queries[:, :, 0] = 1.0
    method = make_method("snapkv", budget=4, window_size=2, kernel_size=1)
    assert kept(method.keep_mask(view(keys, queries))) == [[3, 7, 10, 11]]
    # max pooling over 3 spreads token 3's score to tokens 2 and 4, which then beat token 7

    pooled = make_method("snapkv", budget=5, window_size=2, kernel_size=3)
    assert kept(pooled.keep_mask(view(keys, queries))) == [[2, 3, 4, 10, 11]]


def snapkv_scores_restated(keys, queries, window, kernel, pooling, group_mean_first):
    """SnapKV's prefix scores [H, P] stated plainly: per query head, the last `window` queries'
    causal softmax over the keys averaged over those queries; pooled per query head and then
    averaged over the group (kvpress), or averaged over the group and then pooled."""
    H, S, D = keys.shape
    Hq = queries.shape[1]
    group, P = Hq // H, S - window
    rows = []
    for hq in range(Hq):
        logits = queries[-window:, hq] @ keys[hq // group].T / math.sqrt(D)   # [W, S]
        for i in range(window):
            logits[i, P + i + 1:] = float("-inf")
        rows.append(logits.softmax(-1).mean(0)[:P])
    attention = torch.stack(rows)                                              # [Hq, P]
    pool = (torch.nn.functional.max_pool1d if pooling == "max" else torch.nn.functional.avg_pool1d)
    smooth = lambda x: pool(x[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    if group_mean_first:
        return smooth(attention.view(H, group, P).mean(1))
    return smooth(attention).view(H, group, P).mean(1)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_pools_each_query_head_then_averages_the_group(pooling):
    # snapkv pools per query head, then averages the group (kvpress's SnapKVPress order);
    # pyramidkv and adakv average first (KVCache-Factory's kv_head mode, AdaKV's gqa_support)
    torch.manual_seed(0)
    H, Hq, S, W = 2, 6, 40, 8
    keys, queries = torch.randn(H, S, 16), torch.randn(S, Hq, 16)
    v = view(keys, queries)
    options = dict(budget=20, window_size=W, kernel_size=5, pooling=pooling)
    pooled_first = snapkv_scores_restated(keys, queries, W, 5, pooling, False)
    mean_first = snapkv_scores_restated(keys, queries, W, 5, pooling, True)
    assert torch.allclose(make_method("snapkv", **options).scores(v)[:, :S - W], pooled_first, atol=1e-6)
    for name in ("pyramidkv", "adakv"):
        assert torch.allclose(make_method(name, **options).scores(v)[:, :S - W], mean_first, atol=1e-6)
    # average pooling is linear: the order only matters for max pooling
    assert torch.allclose(pooled_first, mean_first, atol=1e-6) == (pooling == "avg")
    short = make_method("snapkv", budget=20, window_size=W).scores(view(keys[:, :6], queries[:6]))
    assert short.shape == (H, 6) and bool(short.isinf().all())  # a prompt within the window: all window


def kcf_layer_capacity(n, B, W, L, layer, beta=20):
    """Tokens a head of `layer` keeps under KVCache-Factory's PyramidKVCluster.update_kv
    (@ c97f9d7), restated from its control flow: integers, floor divisions, the clamp."""
    if n < B:
        return n                                    # not compressed
    min_num = (B - W) // beta
    max_num = (B - W) * 2 - min_num
    if max_num >= n - W:
        max_num = n - W
        min_num = (B - W) * 2 - max_num
    steps = (max_num - min_num) // (L - 1)
    if n < (B - W) * 2:
        return (B - W) + W                          # uniform: top B - W of the prefix, plus the window
    return (max_num - layer * steps) + W


def test_pyramidkv_budgets_fall_with_depth_as_the_official_schedule():
    # B=50, W=8, beta=20: min = 42 // 20 = 2, max = 84 - 2 = 82, step (82 - 2) // 3 = 26
    method = make_method("pyramidkv", budget=50)
    assert [method.layer_budget(100, layer, 4) for layer in range(4)] == [8 + 82, 8 + 56, 8 + 30, 8 + 4]
    # a prompt shorter than 2 (B - W) = 84: every layer keeps B, like SnapKV
    assert [method.layer_budget(80, layer, 4) for layer in range(4)] == [50] * 4
    # 84 <= n = 88 <= W + max: max is clamped to n - W = 80, min = 84 - 80 = 4, step 76 // 3 = 25
    assert [method.layer_budget(88, layer, 4) for layer in range(4)] == [88, 63, 38, 13]
    # the official schedule on a grid of prompt lengths, budgets and depths
    for L in (2, 12, 30):
        for B in range(9, 400, 13):
            m = make_method("pyramidkv", budget=B)
            for n in range(20, 600, 7):
                assert [m.layer_budget(n, l, L) for l in range(L)] == [kcf_layer_capacity(n, B, 8, L, l)
                                                                       for l in range(L)], (L, B, n)
    # kvpress's schedule, the window inside: B=500 of n=1000, W=64, 30 layers: max = 2B - B/20 = 975
    # is clipped to n - W = 936, so min = 2B - 936 = 64; layer l keeps round(936 - l * 872 / 29)
    kvpress = make_method("pyramidkv", budget=500, window_size=64, schedule="kvpress")
    budgets = [kvpress.layer_budget(1000, layer, 30) for layer in range(30)]
    assert budgets[:3] == [936, 906, 876] and budgets[-1] == 64 and sum(budgets) == 30 * 500
    keys = torch.randn(2, 100, 4)
    for layer, expected in enumerate([90, 64, 38, 12]):
        mask = method.keep_mask(PrefillView(layer, 4, torch.randn(100, 4, 4), keys, torch.arange(100)))
        assert mask.sum(-1).tolist() == [expected] * 2


def adakv_with_scores(scores, **options):
    method = make_method("adakv", budget=8, window_size=2, kernel_size=1, **options)
    method.scores = lambda view: scores  # the selection on its own, over known scores
    H, S = scores.shape
    return method.keep_mask(PrefillView(5, 30, torch.zeros(S, 2 * H, 4), torch.zeros(H, S, 4), torch.arange(S)))


def test_adakv_gives_the_layer_budget_to_the_best_scores_across_heads():
    inf = float("inf")
    # head 0 has 18 strong scores 10, 9, ..., head 1 only weak ones; the last 2 are the window
    head0 = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, .9, .8, .7, .6, .5, .4, .3, .2, inf, inf]
    head1 = [.05 - .001 * i for i in range(18)] + [inf, inf]
    scores = torch.tensor([head0, head1])
    # budget 8 a head -> 16 for the layer; floor int(8 * 0.2) = 1 is taken by the window
    assert kept(adakv_with_scores(scores)) == [list(range(12)) + [18, 19], [18, 19]]
    # floor int(8 * 0.5) = 4: each head first keeps its own best 4 (window + 2), the rest is global
    assert kept(adakv_with_scores(scores, alpha_safeguard=0.5)) == [list(range(10)) + [18, 19], [0, 1, 18, 19]]


def adakv_official_restated(scores, budget, window, alpha):
    """FFY0/AdaKV's AdaptiveSnapKVCluster allocation in plain Python: B' = budget - window; c_h =
    head h's count in the top H B' prefix scores of all heads; head h keeps its top
    round((1 - alpha) c_h + int(alpha B')) prefix tokens and the window."""
    H, S = scores.shape
    P, base = S - window, budget - window
    best = sorted(((float(scores[h, i]), h) for h in range(H) for i in range(P)), reverse=True)[:H * base]
    caps = [round(sum(1 for _, g in best if g == h) * (1 - alpha) + int(base * alpha)) for h in range(H)]
    return [sorted(sorted(range(P), key=lambda i: -float(scores[h, i]))[:caps[h]]) + list(range(P, S))
            for h in range(H)]


def test_adakv_official_allocation_pulls_each_head_toward_its_share():
    inf = float("inf")
    head0 = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, .9, .8, .7, .6, .5, .4, .3, .2, inf, inf]
    head1 = [.05 - .001 * i for i in range(18)] + [inf, inf]
    scores = torch.tensor([head0, head1])
    # B' = 8 - 2 = 6: head 0 holds all 12 of the layer's top 12, head 1 none; floor int(6 * 0.2) = 1:
    # head 0 keeps round(12 * 0.8 + 1) = 11, head 1 round(0 + 1) = 1 (kvpress's: 12 and 0)
    assert kept(adakv_with_scores(scores, allocation="official")) == [list(range(11)) + [18, 19], [0, 18, 19]]
    # alpha 0.5: floor 3, caps round(12 * 0.5 + 3) = 9 and 3
    assert kept(adakv_with_scores(scores, allocation="official", alpha_safeguard=0.5)) == \
        [list(range(9)) + [18, 19], [0, 1, 2, 18, 19]]
    torch.manual_seed(0)
    for alpha in (0.2, 0.5, 0.0, 1.0):
        scores = torch.cat([torch.rand(4, 56) * torch.tensor([[4.], [2.], [1.], [.5]]), torch.full((4, 2), inf)], 1)
        got = kept(adakv_with_scores(scores, allocation="official", alpha_safeguard=alpha))
        assert got == adakv_official_restated(scores, 8, 2, alpha)
    assert len({len(k) for k in got}) == 1  # alpha 1: every head its equal share


def test_random_keeps_exactly_budget_and_repeats_with_seed():
    keys = torch.randn(3, 50, 4)
    a = make_method("random", budget=10).keep_mask(view(keys))
    b = make_method("random", budget=10).keep_mask(view(keys))
    c = make_method("random", budget=10, seed=1).keep_mask(view(keys))
    assert a.sum(-1).tolist() == [10, 10, 10]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="magic"), "unknown method 'magic'; valid: full, random"),
    (dict(name="snapkv", windw=3), "unknown option 'windw'.*valid: window_size"),
    (dict(name="snapkv", window_size="abc"), "window_size='abc'.*must be int"),
    (dict(name="snapkv", kernel_size=4), "kernel_size=4.*odd"),
    (dict(name="snapkv", pooling="mean"), "'max' or 'avg'"),
    (dict(name="knorm", compression=1.0), r"compression must be in \[0, 1\)"),
    (dict(name="knorm", compression=-0.1), r"compression must be in \[0, 1\)"),
    (dict(name="knorm", budget=0), "budget must be a positive"),
    (dict(name="knorm", budget=8, compression=0.5), "either compression or budget"),
    (dict(name="snapkv", budget=16), "budget=16 must exceed window_size=32"),
    (dict(name="streaming_llm", budget=4), "budget=4 must exceed sink_tokens=4"),
    (dict(name="full", compression=0.5), "'full' does not compress"),
    (dict(name="h2o", recent_ratio=1.0), r"recent_ratio=1.0.*in \[0, 1\)"),
    (dict(name="h2o", normalize="maybe"), "normalize='maybe'.*true or false"),
    (dict(name="pyramidkv", schedule="linear"), "'kvcache_factory' or 'kvpress'"),
    (dict(name="tova", window_size=8), "unknown option 'window_size' for method 'tova'; valid: none"),
])
def test_bad_method_settings_name_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(**kwargs)


# --- in the engine ------------------------------------------------------------------------

PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((180, 95, 240, 130))]


@pytest.fixture(scope="module")
def snapkv_llm(smollm2_gguf):
    from nanokv import LLM

    return LLM(str(smollm2_gguf), dtype="float32", method="snapkv", compression=0.5, window_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["kvpress", "official"])
def test_adakv_runs_in_the_engine_with_heads_of_different_lengths(smollm2_gguf, allocation):
    from nanokv import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), dtype="float32", method="adakv", compression=0.5, window_size=8,
              allocation=allocation)
    held = []
    original = llm.scheduler.finish
    llm.scheduler.finish = lambda seq: (held.append(llm.cache.seqs[seq.id].lengths.clone()), original(seq))
    [out] = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=1, ignore_eos=True))
    lengths = held[0]  # [layers, kv-heads] tokens each head kept
    assert (lengths.amax(1) != lengths.amin(1)).any()       # some layer's heads differ in length
    # each layer keeps its total, 3 heads x 120 (official: up to one more, each head's share rounded)
    assert (lengths.sum(1) <= 3 * 120 + (allocation == "official")).all()
    assert out.metrics["kv_cache_bytes"] < out.metrics["kv_cache_bytes_uncompressed"]


@pytest.mark.slow
def test_compression_frees_real_blocks(snapkv_llm):
    from nanokv import SamplingParams

    outs = snapkv_llm.generate(PROMPTS, SamplingParams(max_tokens=1, ignore_eos=True))
    per_block = snapkv_llm.cache.pool.bytes_per_block
    for prompt, out in zip(PROMPTS, outs):
        # every (layer, head) keeps ceil(n / 2) tokens, held in 16-token blocks
        kept_blocks = 30 * 3 * math.ceil(math.ceil(len(prompt) / 2) / 16)
        full_blocks = 30 * 3 * math.ceil(len(prompt) / 16)
        assert out.metrics["kv_cache_bytes"] == kept_blocks * per_block
        assert out.metrics["kv_cache_bytes_uncompressed"] == full_blocks * per_block


@pytest.mark.slow
def test_prefill_allocates_layer_by_layer_so_compression_lowers_the_peak(snapkv_llm):
    from nanokv import SamplingParams

    pool, prompt = snapkv_llm.cache.pool, PROMPTS[2]  # 240 tokens, 15 blocks a head whole
    peak, allocate = 0, pool.allocate

    def tracking(n):
        nonlocal peak
        ids = allocate(n)
        peak = max(peak, pool.num_used)
        return ids

    pool.allocate = tracking
    try:
        snapkv_llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    finally:
        del pool.allocate
    # 29 layers compressed to 120 tokens (8 blocks) in each of 3 heads, the last layer whole
    assert peak == 29 * 3 * 8 + 3 * 15 < 30 * 3 * 15
    seq = snapkv_llm._sequence(prompt, SamplingParams(), chat=False)
    assert snapkv_llm.scheduler.prefill_blocks(seq) >= peak  # what admission plans with


@pytest.mark.slow
def test_preempted_sequences_are_compressed_again_the_same_way(snapkv_llm, smollm2_gguf):
    from nanokv import LLM, SamplingParams

    # short prompts, long outputs: admitted uncompressed (3 blocks a head), compressed to 20
    # tokens, then grown by 80 to 7 blocks a head, so 1500 blocks cannot hold them all
    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(40)] for i in range(8)]
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    roomy = snapkv_llm.generate(prompts, params)
    small = LLM(str(smollm2_gguf), dtype="float32", method="snapkv", compression=0.5, window_size=8,
                kv_cache_memory=1500 * 16 * 64 * 2 * 4)
    tight = small.generate(prompts, params)
    assert small.stats["preemptions"] > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


# --- decode-time methods: H2O and TOVA ------------------------------------------------------

def test_h2o_prefill_keeps_heavy_hitters_and_the_recent_half():
    sums = torch.tensor([[9., 1., 4., 0., 3., 2., 8., 7., .5, 1.5],
                         [0., 9., 1., 8., 2., 7., 3., 6., 4., 5.]])
    v = view(torch.zeros(2, 10, 4))
    v.column_sums = sums
    # budget 4: the last 2 tokens (recent half), then the 2 highest sums among the first 8
    assert kept(make_method("h2o", budget=4).keep_mask(v)) == [[0, 6, 8, 9], [1, 3, 8, 9]]
    assert kept(make_method("h2o", budget=4, recent_ratio=0).keep_mask(v)) == [[0, 2, 6, 7], [1, 3, 5, 7]]
    # kvpress's normalization: key j of 10 is seen by 10 - j queries, so row 0 scores
    # 9/10, 1/9, 4/8, 0/7, 3/6, 2/5, 8/4, 7/3, .5/2, 1.5/1: the best three are 7, 6, 9
    assert kept(make_method("h2o", budget=3, recent_ratio=0).keep_mask(v))[0] == [0, 6, 7]
    assert kept(make_method("h2o", budget=3, recent_ratio=0, normalize="true").keep_mask(v))[0] == [6, 7, 9]
    state = make_method("h2o", budget=4).prefill_state(v)
    assert torch.equal(state["h2o_score"], sums)  # decode accumulates onto the raw sums


def test_tova_prefill_keeps_what_the_last_query_attends_to_averaged_over_heads():
    # two kv-heads, one query head each; the last query of head 0 points at token 2 strongly
    # and token 5 a little, head 1's at token 5 a little: averaged, 2 then 5 then the rest
    S, D = 8, 4
    keys = torch.zeros(2, S, D)
    keys[0, 2, 0], keys[0, 5, 0], keys[1, 5, 0] = 6.0, 3.0, 3.0
    queries = torch.zeros(S, 2, D)
    queries[-1, :, 0] = 1.0
    mask = make_method("tova", budget=2).keep_mask(view(keys, queries))
    assert kept(mask) == [[2, 5], [2, 5]]  # every head of the layer keeps the same tokens


class DenseEviction:
    """H2O or TOVA stated plainly for one sequence, as the model's attention: per (layer,
    kv-head) a list of [position, k, v, score] entries in arrival order, eviction by list
    removal. Independent of nanokv's cache, kernels and methods."""

    def __init__(self, kind, budget, recent):
        self.kind, self.budget, self.recent = kind, budget, recent
        self.heads, self.positions = {}, None

    def __call__(self, layer, q, k, v, sliding_window):
        T, Hq, D = q.shape
        H = k.shape[1]
        group = Hq // H
        heads = self.heads.setdefault(layer, [[] for _ in range(H)])
        for h in range(H):
            heads[h] += [[int(p), k[t, h], v[t, h], 0.0] for t, p in enumerate(self.positions)]
        out, probs = torch.empty_like(q), []
        for h in range(H):
            keys = torch.stack([e[1] for e in heads[h]])
            values = torch.stack([e[2] for e in heads[h]])
            key_pos = torch.tensor([e[0] for e in heads[h]])
            logits = q[:, h * group:(h + 1) * group].transpose(0, 1) @ keys.T / math.sqrt(D)  # [group, T, S]
            logits[:, key_pos[None, :] > self.positions[:, None]] = float("-inf")
            p = logits.softmax(-1)
            out[:, h * group:(h + 1) * group] = (p @ values).transpose(0, 1)
            probs.append(p)
        if T > 1:
            self.prefill(heads, probs)
        else:
            self.decode(heads, probs)
        return out

    def prefill(self, heads, probs):
        n = len(heads[0])
        if self.kind == "h2o":
            for h, entries in enumerate(heads):
                sums = probs[h].sum(1).mean(0)
                for e, s in zip(entries, sums.tolist()):
                    e[3] = s
                older = sorted(range(n - self.recent), key=lambda i: -entries[i][3])[:self.budget - self.recent]
                heads[h][:] = [entries[i] for i in sorted(older)] + entries[n - self.recent:]
        else:
            last = torch.stack([p[:, -1] for p in probs]).mean((0, 1))
            best = sorted(sorted(range(n), key=lambda i: -last[i])[:self.budget])
            for h in range(len(heads)):
                heads[h][:] = [heads[h][i] for i in best]

    def decode(self, heads, probs):
        now = int(self.positions[-1])
        if self.kind == "h2o":
            for h, entries in enumerate(heads):
                for e, p in zip(entries, probs[h][:, 0].mean(0).tolist()):
                    e[3] += p
        else:
            current = torch.stack([p[:, 0] for p in probs]).mean((0, 1)).tolist()
            for h in range(len(heads)):
                for e, p in zip(heads[h], current):
                    e[3] = p
        for entries in heads:
            if len(entries) > self.budget:
                candidates = [e for e in entries if e[0] <= now - self.recent]
                entries.remove(min(candidates, key=lambda e: (e[3], e[0])))


@pytest.mark.parametrize("kind", ["h2o", "tova"])
@pytest.mark.slow
def test_decode_time_eviction_matches_a_plain_statement_of_the_method(smollm2_gguf, kind):
    """Greedy tokens and the positions every (layer, head) holds at the end, through the engine
    (paged cache, per-slot state, swap-into-victim eviction) and through DenseEviction."""
    from nanokv import LLM

    prompt, budget, steps = PROMPTS[0][:120], 48, 30
    llm = LLM(str(smollm2_gguf), dtype="float32", method=kind, budget=budget)
    tokens_out, held = generate_holding(llm, prompt, steps)

    reference = DenseEviction(kind, budget, budget // 2 if kind == "h2o" else 0)
    tokens = restated_greedy(llm.model, reference, prompt, steps)
    expected = [sorted(e[0] for e in entries) for layer in sorted(reference.heads) for entries in reference.heads[layer]]
    assert tokens_out == tokens
    assert all(len(h) == budget for h in held)
    agree = sum(len(set(a) & set(b)) for a, b in zip(held, expected))
    assert agree == budget * len(held), f"{agree} of {budget * len(held)} held positions agree"


@pytest.mark.slow
def test_h2o_holds_its_budget_through_preemption_and_recompute(smollm2_gguf):
    """A sequence preempted mid-generation is re-prefilled: its generated tokens replay their
    evictions one at a time, so it goes on exactly as if never preempted."""
    from nanokv import LLM, SamplingParams

    # 40-token prompts grow to the 60-token budget (4 blocks a head) and hold there: 8 of them
    # need 2880 blocks, more than 2400
    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(40)] for i in range(8)]
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    tight, got = assert_preemption_repeats(partial(LLM, str(smollm2_gguf), dtype="float32", method="h2o", budget=60),
                                           prompts, params, 2400)
    assert all(o.metrics["kv_cache_bytes"] == 30 * 3 * 4 * tight.cache.pool.bytes_per_block for o in got)


@pytest.mark.slow
def test_a_question_after_the_context_is_not_seen_by_the_compression(snapkv_llm):
    """(context, question): the method compresses the context alone, as kvpress does, then the
    question attends over it and is kept whole."""
    from nanokv import SamplingParams

    context = "The quick brown fox jumps over the lazy dog. " * 12
    held = []
    finish = snapkv_llm.scheduler.finish

    def capture(seq):
        s = snapkv_llm.cache.seqs[seq.id]
        slots = snapkv_llm.cache.flat_slots(s.tables[10, 0], torch.arange(int(s.lengths[10, 0])))
        held.append(sorted(snapkv_llm.cache.pool.pos.view(-1)[slots].tolist()))
        finish(seq)

    snapkv_llm.scheduler.finish = capture
    try:
        ids, n = snapkv_llm.encode_with_question(context, "\n\nWhat does the fox do?")
        assert ids[:n] == snapkv_llm.encode_with_question(context, "\n\nWho is lazy?")[0][:n]
        snapkv_llm.generate([(context, "\n\nWhat does the fox do?")], SamplingParams(max_tokens=1))
        snapkv_llm.generate([ids[:n]], SamplingParams(max_tokens=1))  # the context alone
    finally:
        del snapkv_llm.scheduler.finish
    with_question, context_alone = held
    assert len(with_question) == math.ceil(n / 2) + (len(ids) - n)
    assert with_question[:math.ceil(n / 2)] == context_alone          # the same context tokens kept
    assert with_question[math.ceil(n / 2):] == list(range(n, len(ids)))  # the question, whole


@pytest.mark.parametrize("name, message", [
    ("lorc+kivi", "lorc keeps tokens as low-rank latents, which quantized blocks cannot hold"),
    ("palu+int8", "palu keeps tokens as low-rank latents"),
    ("think+kivi", "think keeps older keys in fewer channels"),
    ("kvsharer+int4", "kvsharer shares whole layers"),
    ("kvzip+kivi", "kvzip with these options compacts earlier layers again"),
])
def test_a_combination_the_cache_cannot_hold_is_refused_when_made(name, message):
    """Refused by make_method, before any model loads (lorc+kivi used to drop the quantization silently)."""
    with pytest.raises(ValueError, match=message):
        make_method(name, compression=0.5)
    if name == "kvzip+kivi":  # layer by layer, kvzip never returns to an earlier layer
        assert make_method(name, compression=0.5, layerwise="true").quantization is not None
