"""PyramidInfer, DynamicKV and DBudgetKV: budget allocation across layers (and, for DBudgetKV, a
budget each prompt finds for itself). Each on hand-built inputs whose answer is worked out by
hand, against a plain restatement, and in the engine under continuous batching with mixed prompt
lengths, preemption and recompute, holding what it promises in real blocks."""

import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.base import PrefillView, observation_attention
from nanokv.methods.dbudgetkv import dropped_by_threshold
from test_methods_decode_wave2 import TINY_PROMPTS, pointing, serve

inf = float("inf")


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def views(L, S, seed, H=2, group=2, D=8):
    """One random prompt's PrefillView at each of L layers, sharing one sequence_state."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    return [PrefillView(layer, L, torch.randn(S, H * group, D, generator=g) * 2, torch.randn(H, S, D, generator=g) * 2,
                        torch.arange(S), sequence_state=state) for layer in range(L)]


def run_prefill(method, vs):
    """Each layer's keep mask, then the earlier layers' re-trims, as the engine applies them ->
    the prompt positions each (layer, head) ends holding."""
    held = {}
    for v in vs:
        keep = method.keep_mask(v)
        S = v.keys.shape[1]
        held[v.layer] = [list(range(S))] * v.keys.shape[0] if keep is None else kept(keep)
        for layer, mask in method.earlier_keep_masks(v).items():
            held[layer] = [[p for p, k in zip(row, m.tolist()) if k] for row, m in zip(held[layer], mask)]
    return [held[layer] for layer in range(len(vs))]


# --- pyramidinfer -----------------------------------------------------------------------------

def test_pyramidinfer_layer_budgets_follow_the_official_cosine_decay():
    method = make_method("pyramidinfer", budget=12)
    assert method.decay(0, 4) == 1.0 and math.isclose(method.decay(4, 4), 0.9)
    assert math.isclose(method.decay(2, 4), 0.95)                      # cos(pi / 2) = 0: halfway
    # n = 40: R = 1 + int(40 x 0.2) = 9 recent tokens, 4 x (12 - 9) = 12 context tokens over the
    # layers by prod_{i<l} r_i = 1, 1, 0.98536, 0.93609 (sum 3.92145): floors 3, 3, 3, 2 (12 x
    # 0.93609 / 3.92145 = 2.86), the one left over to layer 0
    assert method.layer_budgets(40, 4) == [13, 12, 12, 11]
    # a longer prompt: the same shape, the layers' total is L x B
    budgets = make_method("pyramidinfer", budget=300).layer_budgets(1000, 32)
    assert sum(budgets) == 32 * 300 and budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    # within budget: whole; a recent window over the budget (compression 0.9 > 1 - 0.2): the newest B
    assert method.layer_budgets(12, 4) == [12] * 4
    assert make_method("pyramidinfer", compression=0.9).layer_budgets(100, 3) == [10] * 3


def test_pyramidinfer_keeps_what_the_newest_recent_queries_attend_to():
    # 10 tokens: R = 1 + int(10 x 0.2) = 3 recent (7, 8, 9), whose queries point at 2, 8 (itself)
    # and 4. One layer, budget 4: one context token. Tokens 2 and 4 each get ~1/3 of the
    # attention; the distance weights 1, 1.1, 1.2 favour the newest query's (4); weights falling
    # (distance_weight 0.5: 1, 0.75, 0.5) favour the oldest's (2). A sink outranks both.
    keys, queries = pointing([0] * 7 + [2, 8, 4], 10)
    v = PrefillView(0, 1, queries, keys, torch.arange(10))
    assert kept(make_method("pyramidinfer", budget=4, sink_tokens=0).keep_mask(v)) == [[4, 7, 8, 9]]
    v.sequence_state.clear()
    assert kept(make_method("pyramidinfer", budget=4, sink_tokens=0, distance_weight=0.5).keep_mask(v)) == [[2, 7, 8, 9]]
    v.sequence_state.clear()
    assert kept(make_method("pyramidinfer", budget=4, sink_tokens=1).keep_mask(v)) == [[0, 7, 8, 9]]


def test_pyramidinfer_a_deeper_layer_chooses_among_what_the_last_one_kept():
    # two layers, budget 5 on 10 tokens: R = 3, 2 x 2 context tokens as [2, 2]. Layer 0's recent
    # queries point at 2, 5, 4 -> it keeps 4 and 5 (the newer queries weigh more than 2's);
    # layer 1's point at 2, 3, 4: 2 and 3 are gone, so it keeps 4 and one of what layer 0 kept
    # (5: the only other context token it still holds)
    first = pointing([0] * 7 + [2, 5, 4], 10)
    second = pointing([0] * 7 + [2, 3, 4], 10)
    state = {}
    method = make_method("pyramidinfer", budget=5, sink_tokens=0)
    assert method.layer_budgets(10, 2) == [5, 5]
    k0 = method.keep_mask(PrefillView(0, 2, first[1], first[0], torch.arange(10), sequence_state=state))
    k1 = method.keep_mask(PrefillView(1, 2, second[1], second[0], torch.arange(10), sequence_state=state))
    assert kept(k0) == [[4, 5, 7, 8, 9]] and kept(k1) == [[4, 5, 7, 8, 9]]
    # alone (nothing dropped before it) layer 1 would keep 3 and 4
    assert kept(method.keep_mask(PrefillView(1, 2, second[1], second[0], torch.arange(10)))) == [[3, 4, 7, 8, 9]]


def pyramidinfer_restated(vs, budgets, recent, sinks, weight):
    """Each layer: softmax of each recent query over the tokens still held (and not after it),
    per query head; average over heads, weigh query j of R by 1 + (weight - 1) j / (R - 1),
    average; the sinks and the recent tokens first; keep the top budgets[l]."""
    held, out = None, []
    for v, keep in zip(vs, budgets):
        S, D = v.keys.shape[1], v.keys.shape[2]
        held = held or list(range(S))
        group = v.queries.shape[1] // v.keys.shape[0]
        score = {p: 0.0 for p in held}
        for j in range(recent):
            qpos = S - recent + j
            w = 1 + (weight - 1) * j / (recent - 1) if recent > 1 else 1.0
            for hq in range(v.queries.shape[1]):
                q, k = v.queries[qpos, hq].double(), v.keys[hq // group].double()
                visible = [p for p in held if p <= qpos]
                logits = torch.stack([q @ k[p] / math.sqrt(D) for p in visible]).softmax(0)
                for p, a in zip(visible, logits.tolist()):
                    score[p] += w * a / (recent * v.queries.shape[1])
        ranked = sorted(held, key=lambda p: (p >= S - recent or p < sinks, score[p]), reverse=True)
        held = sorted(ranked[:keep])
        out.append([held] * v.keys.shape[0])
    return out


def test_pyramidinfer_matches_a_plain_restatement():
    L, S = 4, 30
    method = make_method("pyramidinfer", budget=14, sink_tokens=2)
    budgets = method.layer_budgets(S, L)
    assert budgets == [15, 14, 14, 13]            # R = 7; 28 context tokens as 8, 7, 7, 6
    for seed in range(3):
        vs = views(L, S, seed)
        assert run_prefill(method, vs) == pyramidinfer_restated(vs, budgets, method.recent(S), 2, 1.2)


# --- dynamickv --------------------------------------------------------------------------------

def test_dynamickv_shares_follow_where_the_top_scores_fall():
    method = make_method("dynamickv", budget=6, window_size=2)
    # two layers of one head and 6 prefix tokens; base 4 a layer: the top 2 x 1 x 4 = 8 scores of
    # both maps hold 6 of layer 0's and 2 of layer 1's -> 2 x 4 = 8 tokens as 6 and 2
    a = torch.tensor([[9.0, 8, 7, 6, 5, 4]])
    b = torch.tensor([[4.5, 4.4, 0, 0, 0, 0]])
    assert method.shares([a, b], 4, 2) == [6, 2]
    # mid-way (2 of 4 layers seen) the two share all 4 x 4 = 16: counts 6 and 2 -> 12 and 4
    assert method.shares([a, b], 4, 4) == [12, 4]
    # the remainder goes to the newest layer: base 3, the top 3 x 3 = 9 scores (9 8.5 8 7.5 7 6.5
    # 6.4 6.3 6) count 4, 2, 3; 5 layers x 3 = 15 as floors 6, 3, 5 and the one left to the newest
    c = torch.tensor([[9.0, 8, 7, 6, 0, 0]])
    d = torch.tensor([[8.5, 7.5, 0, 0, 0, 0]])
    e = torch.tensor([[6.5, 6.4, 6.3, 0, 0, 0]])
    assert method.shares([c, d, e], 3, 5) == [6, 3, 6]


def test_dynamickv_reshares_every_m_layers_and_trims_the_earlier_ones():
    # 4 layers, 12 tokens, budget 4 with window 2: base 2, cap = min(10 x 2, 10) = 10. Layer 0
    # keeps all 10 prefix tokens; at layer 1 (1 % 2 == 1) the two layers re-share 4 x 2 = 8.
    # Layer 0's window queries point at token 3 and layer 1's spread evenly over everything, so
    # layer 0 holds the sharpest scores and most of the 8
    L, S, W = 4, 12, 2
    method = make_method("dynamickv", budget=4, window_size=W, kernel_size=1, update_interval=2)
    sharp = pointing([0] * 10 + [3, 3], S)
    flat = (torch.zeros(1, S, S), torch.zeros(S, 1, S))
    vs = [PrefillView(0, L, sharp[1], sharp[0], torch.arange(S), sequence_state={})]
    vs.append(PrefillView(1, L, flat[1], flat[0], torch.arange(S), sequence_state=vs[0].sequence_state))
    assert method.keep_mask(vs[0]).all() and method.earlier_keep_masks(vs[0]) == {}
    keep1 = method.keep_mask(vs[1])
    # layer 0: sum over 2 window queries = 2 at token 3, ~0 elsewhere; layer 1: 2 / 11 or 2 / 12
    # each. The top 2 x 1 x 2 = 4 of the 20 scores: token 3 of layer 0 and three of layer 1's ->
    # counts 1 and 3 of 8: shares 2 and 6
    assert method.shares([method.prefix_scores(v) for v in vs], 2, L) == [2, 6]
    assert int(keep1.sum()) == 6 + W
    trims = method.earlier_keep_masks(vs[1])
    assert list(trims) == [0] and trims[0].shape == (1, S)                  # over the 12 it held
    assert kept(trims[0])[0][0] == 3 and int(trims[0].sum()) == 2 + W       # token 3, one more, the window
    # planned: at worst, while layer 3 runs, layers 0 and 1 hold 8 + 2 W after the re-share and
    # layer 2 its whole 12 (cap + W): 24 over the L - 1 = 3 layers the scheduler counts
    assert method.kept_after_prefill(S, 0, L) == 8


def dynamickv_restated(vs, B, W, m, radio, L):
    """Per layer: SnapKV-style prefix scores (summed window attention, no pooling: kernel 1),
    keep cap; at each re-share the L' layers seen so far split L x (B - W) by their counts in the
    top L' x H x (B - W) scores, each keeping min(share, what it holds) of its own best; and the
    most the compacted layers hold while a layer runs."""
    base = B - W
    S = vs[0].keys.shape[1]
    P = S - W
    cap = min(int(radio * base), P)
    scores, prefix, peak = [], [], 0
    for v in vs:
        peak = max(peak, sum(prefix) + W * len(prefix))
        H = v.keys.shape[0]
        att = observation_attention(v, W).sum(dim=1)[:, :P]
        scores.append(att.view(H, -1, P).mean(dim=1))
        prefix.append(cap)
        if v.layer % m == m - 1 or v.layer == L - 1:
            flat = sorted(((float(s), j) for j, sc in enumerate(scores) for s in sc.flatten()), reverse=True)
            top = flat[:len(scores) * H * base]
            counts = [sum(1 for _, j in top if j == i) for i in range(len(scores))]
            shares = [L * base * c // sum(counts) for c in counts]
            shares[-1] += L * base - sum(shares)
            prefix = [min(s, p) for s, p in zip(shares, prefix)]
    held = []
    for sc, k in zip(scores, prefix):
        top = sc.topk(k, dim=-1).indices.tolist() if k else [[] for _ in sc]
        held.append([sorted(t + list(range(P, S))) for t in top])
    return held, peak


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_dynamickv_matches_a_plain_restatement_and_plans_for_its_peak(m):
    L, S, B, W = 5, 40, 10, 4
    method = make_method("dynamickv", budget=B, window_size=W, kernel_size=1, update_interval=m, radio_max=3)
    for seed in range(2):
        vs = views(L, S, seed)
        want, peak = dynamickv_restated(vs, B, W, m, 3.0, L)
        assert run_prefill(method, vs) == want
        assert sum(len(h[0]) for h in want) <= L * B
        assert (L - 1) * method.kept_after_prefill(S, 0, L) >= peak


# --- dbudgetkv --------------------------------------------------------------------------------

def test_dbudgetkv_drops_while_the_last_querys_attention_norm_stays_within_the_threshold():
    # one head, ranked tokens best first with the last query's attention 0.5, 0.3, 0.1, 0.1:
    # keeping the best 1, 2, 3, 4 leaves norms 0.5, 0.5831, 0.5916, 0.6, so the relative drop is
    # 0.167, 0.028, 0.014, 0: threshold 0.05 keeps 2 (drops 2), 0.02 keeps 3, 0 keeps all, 0.2 keeps 1
    attention = torch.tensor([[0.1, 0.5, 0.1, 0.3]])
    order = torch.tensor([[1, 3, 0, 2]])
    assert [dropped_by_threshold(attention, order, t) for t in (0.05, 0.02, 0.0, 0.2)] == [2, 1, 0, 3]
    # two heads: the norms are averaged over heads before the ratio. Head 0 as above, head 1
    # flat (0.25 each: 0.25, 0.3536, 0.4330, 0.5): mean 0.375, 0.4683, 0.5123, 0.55 -> drops
    # 0.318, 0.149, 0.069, 0: at 0.05 every head keeps all 4, at 0.1 both keep 3
    two = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    orders = torch.tensor([[1, 3, 0, 2], [0, 1, 2, 3]])
    assert dropped_by_threshold(two, orders, 0.05) == 0 and dropped_by_threshold(two, orders, 0.1) == 1


def dbudgetkv_restated(attention, order, threshold):
    """The official loop: positions least important first; for each i, the mean over heads of the
    norm of what is left after dropping the first i, against the mean full norm."""
    H, C = order.shape
    ascending = order.flip(1)
    base = sum(math.sqrt(sum(float(attention[h, p]) ** 2 for p in ascending[h])) for h in range(H)) / H
    best = 0
    for i in range(C):
        left = sum(math.sqrt(sum(float(attention[h, p]) ** 2 for p in ascending[h, i:])) for h in range(H)) / H
        if (base - left) / base <= threshold + 1e-7:
            best = i
    return best


def test_dbudgetkv_matches_the_official_loop_and_keeps_the_window():
    torch.manual_seed(3)
    for t in (0.0, 0.01, 0.05, 0.3):
        attention = torch.rand(3, 20).pow(4).softmax(-1)
        order = torch.rand(3, 15).argsort(-1)
        assert dropped_by_threshold(attention, order, t) == dbudgetkv_restated(attention, order, t)
    # in a view: the window (4) always, the rest among each head's ranked best, capped by the budget
    v = views(1, 30, 0)[0]
    method = make_method("dbudgetkv", budget=16, window_size=4, threshold=0.05)
    keep = method.keep_mask(v)
    att = observation_attention(v, 4)
    rank = att.sum(1)[:, :26].view(2, 2, 26).mean(1)
    order = rank.topk(12, dim=-1).indices
    n = 12 - dbudgetkv_restated(att[:, -1].view(2, 2, 30).mean(1), order, 0.05)
    assert kept(keep) == [sorted(order[h, :n].tolist() + list(range(26, 30))) for h in range(2)]
    assert 4 < int(keep[0].sum()) <= 16 and (keep.sum(-1) == keep[0].sum()).all()
    # a higher threshold prunes at least as far; the cap bounds it from above
    more = make_method("dbudgetkv", budget=16, window_size=4, threshold=0.5).keep_mask(v)
    assert int(more[0].sum()) <= int(keep[0].sum())
    assert int(make_method("dbudgetkv", budget=10 ** 6, window_size=4, threshold=0.0).keep_mask(v)[0].sum()) == 30


# --- in the engine ----------------------------------------------------------------------------

ENGINE = {
    "pyramidinfer": dict(budget=8, sink_tokens=1),
    "dynamickv": dict(budget=8, window_size=2, kernel_size=3),
    "dbudgetkv": dict(budget=8, window_size=2),
}


@pytest.mark.parametrize("kind", list(ENGINE))
def test_mixed_prompts_hold_what_the_method_promises_through_preemption(tiny, kind):
    """Continuous batching of prompts shorter and longer than the budget: each (layer, head) holds
    what the prefill promised (pyramidinfer: its layer's budget; dynamickv: one share per layer,
    the layers' total L x B; dbudgetkv: at most the cap, every head of a layer alike) plus the
    tokens generated, in just the blocks that takes; the pool gets every block back; and with too
    few blocks sequences are preempted, recomputed, and end the same."""
    method = make_method(kind, **ENGINE[kind])
    steps, L = 6, tiny[1].num_layers
    roomy, held, preemptions, cache = serve(tiny, method, TINY_PROMPTS, 400, steps)
    assert preemptions == 0 and cache.pool.num_free == cache.pool.usable_blocks
    for prompt, (lengths, blocks) in zip(TINY_PROMPTS, held):
        n = len(prompt)
        prompt_part = lengths - (steps - 1)                  # the last token is sampled, never cached
        assert (blocks == (lengths + 3) // 4).all()
        assert (prompt_part == prompt_part[:, :1]).all()      # every head of a layer alike
        if kind == "pyramidinfer":
            assert prompt_part[:, 0].tolist() == method.layer_budgets(n, L)
        elif kind == "dynamickv":
            assert int(prompt_part[:, 0].sum()) <= L * min(n, 8) and (prompt_part <= n).all()
            if n <= 8:
                assert (prompt_part == n).all()
        else:
            assert (prompt_part <= min(n, 8)).all() and (prompt_part >= min(n, 2)).all()
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 29, steps)
    assert tight_preemptions > 0 and tight == roomy
    assert cache.pool.num_free == cache.pool.usable_blocks


def test_dynamickv_in_the_engine_reshares_deeper_models(tiny_deep):
    """5 layers re-sharing every 2: the long prompts end with L x B in total, unevenly."""
    method = make_method("dynamickv", budget=8, window_size=2, kernel_size=3, update_interval=2)
    prompts = [[(i * 37 + j * 11) % 256 for j in range(n)] for i, n in enumerate((40, 30, 6))]
    outs, held, _, cache = serve(tiny_deep, method, prompts, 400, 3)
    for prompt, (lengths, _) in zip(prompts, held):
        prompt_part = lengths[:, 0] - 2
        if len(prompt) > 8:
            assert int(prompt_part.sum()) <= 5 * 8 and len(set(prompt_part.tolist())) > 1
        else:
            assert (prompt_part == len(prompt)).all()
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, message", [
    ("pyramidinfer", dict(recent_ratio=1.0), "recent_ratio=1.0 .* must be a number in \\[0, 1\\)"),
    ("pyramidinfer", dict(prefill_decay_ratio=0.0), "must be a number in \\(0, 1\\]"),
    ("pyramidinfer", dict(decay_strategy="exp"), "'cosine' or 'linear'"),
    ("pyramidinfer", dict(budget=4), "budget=4 must exceed sink_tokens=4"),
    ("dynamickv", dict(radio_max=0.5), "radio_max=0.5 .* must be a number >= 1"),
    ("dynamickv", dict(update_interval=0), "update_interval=0 .* must be an integer >= 1"),
    ("dynamickv", dict(budget=8), "budget=8 must exceed window_size=8"),
    ("dbudgetkv", dict(threshold=1.5), "threshold=1.5 .* must be a number in \\[0, 1\\)"),
    ("dbudgetkv", dict(budget=32), "budget=32 must exceed window_size=32"),
])
def test_bad_options_say_what_is_valid(name, options, message):
    options = {"compression": 0.5, **options} if "budget" not in options else options
    with pytest.raises(ValueError, match=message):
        make_method(name, **options)
