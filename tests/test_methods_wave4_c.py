"""BUZZ (sinks + window + segmented heavy hitters, cut when full) and KVCrush (heavy hitters plus a
representative per bucket of alike head-behaviour bits). Each on hand-built inputs whose kept
tokens are worked out by hand, against a plain restatement, then in the engine: mixed prompt
lengths under continuous batching, preemption and recompute, holding what it promises in real
blocks."""

import math
import random

import pytest
import torch

from helpers import held_positions
from nanokv.methods import make_method
from nanokv.methods.base import DecodeStep, PrefillView, hashed_uniform
from test_methods_decode_wave2 import TINY_PROMPTS, serve


def decode_step(positions, budget, order=None, H=1, layer=3):
    """A DecodeStep for one sequence whose H heads hold `positions` (all visible), in slot order
    `order` (a permutation of the slots) if given, the query at the newest position."""
    pos = torch.tensor(positions)
    if order is not None:
        pos = pos[torch.tensor(order)]
    key_positions = pos.expand(1, H, len(positions))
    return DecodeStep(layer, torch.tensor([max(positions)]), torch.tensor([0]), key_positions,
                      torch.ones(1, H, len(positions), dtype=torch.bool), torch.tensor([budget]))


def evicted(method, scores, state, st):
    """The positions the engine drops: decode_budgets says how many, the lowest scores outside the
    recent window go, the oldest among equals (nanokv/engine/attention.py _evict)."""
    need = int(st.visible.sum() - method.decode_budgets(state, st).sum()) if method.budgets_from_state else \
        max(0, int(st.visible.sum()) - int(st.budgets[0]))
    recent = int(method.recent_window(st.budgets)[0])
    candidates = [(float(s), int(p)) for s, p in zip(scores.flatten(), st.key_positions.flatten())
                  if int(p) <= int(st.positions[0]) - recent]
    return sorted(p for _, p in sorted(candidates)[:need])


def prefill_view(column_sums, layer=0):
    H, S = column_sums.shape
    return PrefillView(layer, 2, torch.zeros(S, H, 4), torch.zeros(H, S, 4), torch.arange(S), column_sums=column_sums)


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


# --- BUZZ -------------------------------------------------------------------------------------

def test_buzz_cut_thins_the_old_sample_and_keeps_each_new_segments_heavy_hitter():
    # budget 8, 1 sink, window 2, stride 3: the threshold is 5. The head holds 9 (one over): the
    # sink 0; the old sample 1, 3, 5 (kept by an earlier cut), thinned every (3+1)//2 = 2nd from the
    # oldest: 1 and 5 stay, 3 goes; the new part 6, 7, 8 is one segment of 3 whose most attended,
    # 7, stays; the window 9, 10 stays. Kept: 0, 1, 5, 7, 9, 10; dropped 3, 6, 8.
    method = make_method("buzz", budget=8, sink_size=1, window_size=2, stride=3)
    positions = [0, 1, 3, 5, 6, 7, 8, 9, 10]
    order = [4, 8, 0, 2, 6, 1, 3, 7, 5]              # slots out of position order: positions rule
    st = decode_step(positions, 8, order)
    score = torch.tensor([[[5.0, 9.0, 9.0, 0.0, 1.0, 2.0, 1.5, 0.0, 0.0]]])
    sampled = torch.tensor([[[0, 1, 1, 1, 0, 0, 0, 0, 0]]], dtype=torch.int32)
    state = {"buzz_score": score[..., order], "buzz_sampled": sampled[..., order]}
    probs = torch.zeros(1, 1, 2, 9)
    scores, new = method.decode_scores(probs, state, st)
    assert evicted(method, scores, new, st) == [3, 6, 8]
    assert method.decode_budgets(new, st).tolist() == [[6]]
    flags = {int(p): int(f) for p, f in zip(st.key_positions.flatten(), new["buzz_sampled"].flatten())}
    # the kept "other" tokens are now old sample; the sink and window are not; the dropped are marked
    assert flags == {0: 0, 1: 1, 3: -1, 5: 1, 6: -1, 7: 1, 8: -1, 9: 0, 10: 0}


def test_buzz_segments_start_at_the_oldest_new_token_and_ties_keep_the_oldest():
    # a 14-token prompt, budget 10, sink 1, window 3, stride 4: positions 1..10 are new, in
    # segments 1-4, 5-8, 9-10. Head 0: 2 wins the first, 5 and 7 tie (the oldest, 5, stays), 10
    # wins the last. Kept: 0, 2, 5, 10, 11, 12, 13 (7 of the budget 10).
    method = make_method("buzz", budget=10, sink_size=1, window_size=3, stride=4)
    sums = torch.tensor([[9.0, 1.0, 3.0, 0.0, 0.0, 4.0, 0.0, 4.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    view = prefill_view(sums)
    assert kept(method.keep_mask(view)) == [[0, 2, 5, 10, 11, 12, 13]]
    sampled = method.prefill_state(view)["buzz_sampled"]
    assert kept(sampled) == [[2, 5, 10]]
    # a prompt within the budget is left alone
    assert method.keep_mask(prefill_view(sums[:, :10])) is None


def official_cut(entries, sample, k, w, s):
    """The official BuzzKVCacheWithAccumulation cut over a list of (position, score) in cache order:
    sink, old sample (the first `sample` of the rest), new part, window -> (kept, new sample size)."""
    sink, other, window = entries[:k], entries[k:len(entries) - w], entries[len(entries) - w:]
    old = other[:sample][::(s + 1) // 2]
    new, picked = other[sample:], []
    for start in range(0, len(new), s):
        chunk = new[start:start + s]
        picked.append(max(chunk, key=lambda e: (e[1], -e[0])))  # torch max: the first of equals
    return sink + old + picked + window, len(old) + len(picked)


def test_buzz_decode_matches_a_plain_restatement_of_the_official_cache():
    """Random attention over a long generation (several cuts, the old sample thinned again and
    again): the method's evictions, slots shuffled every step, against the official list logic."""
    rng = random.Random(0)
    B, k, w, s, H = 14, 2, 3, 3, 2
    method = make_method("buzz", budget=B, sink_size=k, window_size=w, stride=s)
    prompt = 9
    sums = torch.rand(H, prompt)
    heads = [[(p, float(sums[h, p])) for p in range(prompt)] for h in range(H)]
    samples = [0] * H
    # the method's cache: per head, position -> (score, sampled)
    state = {h: {p: (float(sums[h, p]), 0) for p in range(prompt)} for h in range(H)}
    for position in range(prompt, prompt + 40):
        attention = [[rng.random() for _ in range(position + 1)] for _ in range(H)]
        for h in range(H):
            heads[h] = [(p, sc + attention[h][p]) for p, sc in heads[h]] + [(position, attention[h][position])]
            if len(heads[h]) > B:
                heads[h], samples[h] = official_cut(heads[h], samples[h], k, w, s)
        # the method, over the same tokens in a shuffled slot order (each head its own)
        slot_pos = []
        for h in range(H):
            held = sorted(state[h]) + [position]
            rng.shuffle(held)
            slot_pos.append(held)
        st = DecodeStep(1, torch.tensor([position]), torch.tensor([prompt]), torch.tensor([slot_pos]),
                        torch.ones(1, H, len(slot_pos[0]), dtype=torch.bool), torch.tensor([B]))
        score = torch.tensor([[[state[h].get(p, (0.0, 0))[0] for p in slot_pos[h]] for h in range(H)]])
        flags = torch.tensor([[[state[h].get(p, (0.0, 0))[1] for p in slot_pos[h]] for h in range(H)]],
                             dtype=torch.int32)
        probs = torch.tensor([[[[attention[h][p] for p in slot_pos[h]]] for h in range(H)]])
        scores, new = method.decode_scores(probs, {"buzz_score": score, "buzz_sampled": flags}, st)
        budgets = method.decode_budgets(new, st)[0]
        for h in range(H):
            sub = DecodeStep(1, st.positions, st.prompt_lens, st.key_positions[:, h:h + 1], st.visible[:, h:h + 1],
                             st.budgets)
            gone = evicted(method, scores[:, h:h + 1], {"buzz_sampled": new["buzz_sampled"][:, h:h + 1]}, sub)
            assert len(slot_pos[h]) - len(gone) == int(budgets[h])
            state[h] = {p: (float(new["buzz_score"][0, h, i]), int(new["buzz_sampled"][0, h, i]))
                        for i, p in enumerate(slot_pos[h]) if p not in gone}
            assert sorted(state[h]) == [p for p, _ in heads[h]], f"position {position}, head {h}"
            for p, sc in heads[h]:
                assert state[h][p][0] == pytest.approx(sc, rel=1e-5)


def buzz_held(prompt_len, fed, B, k, w, s):
    """How many tokens a head holds after its prompt and `fed` decode steps (the counts alone)."""
    def cut(n, sample):
        new = n - k - w - sample
        sample = math.ceil(sample / ((s + 1) // 2)) + math.ceil(new / s)
        return k + sample + w, sample
    n, sample = (prompt_len, 0) if prompt_len <= B else cut(prompt_len, 0)
    for _ in range(fed):
        n += 1
        if n > B:
            n, sample = cut(n, sample)
    return n


def test_buzz_holds_its_cuts_in_real_blocks_through_preemption(tiny):
    """Mixed prompt lengths under continuous batching: after every decode step each (layer, head)
    holds what the cuts leave (the counts restated), at most the budget; the pool gets every block
    back; with too few blocks sequences are preempted and recomputed with the same outputs."""
    budget, steps = 12, 20
    method = make_method("buzz", budget=budget, sink_size=2, window_size=4, stride=3)
    checked = []

    def check(seq, position, cache):
        lengths = cache.seqs[seq.id].lengths
        expected = buzz_held(len(seq.prompt_token_ids), position - len(seq.prompt_token_ids) + 1, budget, 2, 4, 3)
        assert (lengths == expected).all(), (seq.id, position, lengths, expected)
        checked.append(expected)

    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, steps, on_decode=check)
    assert preemptions == 0 and max(checked) == budget and min(checked) < budget
    for (lengths, blocks), prompt in zip(held, TINY_PROMPTS):
        n = buzz_held(len(prompt), steps - 1, budget, 2, 4, 3)
        assert (lengths == n).all() and (blocks == math.ceil(n / 4)).all()
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, steps)
    assert tight_preemptions > 0
    assert tight == roomy
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=8, sink_size=4, window_size=4), r"budget=8 must exceed sink_size \+ window_size = 8"),
    (dict(budget=64, stride=0), r"stride=0 .* must be an integer >= 1"),
    (dict(budget=64, window_size=-1), r"window_size=-1 .* must be an integer >= 0"),
    (dict(budget=64, sink_size="x"), r"sink_size='x' .* must be int"),
])
def test_buzz_bad_settings_name_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method("buzz", **kwargs)


def test_buzz_a_small_compression_budget_shrinks_the_window_then_the_sinks():
    method = make_method("buzz", compression=0.5)  # sink 4, window 160
    sinks, window = method.sizes(torch.tensor([600, 100, 3]))
    assert sinks.tolist() == [4, 4, 2] and window.tolist() == [160, 95, 0]


# --- KVCrush ----------------------------------------------------------------------------------

# One sequence, two kv-heads, 9 held tokens, budget 8: 2 representatives (0.25 x 8), a recent window
# of 3 (half of the 6 left: positions 6, 7, 8), 3 heavy hitters. Accumulated attention per head:
SCORES = torch.tensor([[[10.0, 10.0, 10.0, 3.0, 2.0, 0.0, 1.0, 0.0, 0.0],
                        [10.0, 10.0, 10.0, 0.0, 2.0, 3.0, 1.0, 0.0, 0.0]]])
# Mean importance: 0, 1, 2 (10) are the heavy hitters; 3 (1.5), 4 (2), 5 (1.5) the pool. With
# top_share 0.7 each head's bit is 1 for its top floor(0.7 x 9) = 6: head 0 {0, 1, 2, 3, 4, 6},
# head 1 {0, 1, 2, 5, 4, 6}. Pool bits (head 0, head 1): 3 (1, 0), 4 (1, 1), 5 (0, 1). The pool of 3
# keeps 2: sorted by Hamming distance to the anchor, then position, the last goes.
#   zeros (0, 0): distances 1, 2, 1 -> order 3, 5, 4: 4 goes
#   ones (1, 1): 1, 0, 1 -> 4, 3, 5: 5 goes
#   alternate (0, 1): 2, 1, 0 -> 5, 4, 3: 3 goes
#   mean: each bit the pool's majority, (1, 1) -> as ones: 5 goes
@pytest.mark.parametrize("anchor, victim", [("zeros", 4), ("ones", 5), ("alternate", 3), ("mean", 5)])
def test_kvcrush_evicts_the_token_its_anchor_sorts_last_in_the_pool(anchor, victim):
    method = make_method("kvcrush", budget=8, top_share=0.7, anchor=anchor)
    st = decode_step(list(range(9)), 8, order=[8, 2, 5, 0, 7, 3, 1, 6, 4], H=2)
    shuffled = SCORES[..., st.key_positions[0, 0]]
    scores, new = method.decode_scores(torch.zeros(1, 2, 2, 9), {"kvcrush_score": shuffled}, st)
    assert evicted(method, scores[:, :1], new, DecodeStep(3, st.positions, st.prompt_lens, st.key_positions[:, :1],
                                                          st.visible[:, :1], st.budgets)) == [victim]
    assert torch.equal(scores[:, 0], scores[:, 1])  # every head of the layer drops the same token
    torch.testing.assert_close(new["kvcrush_score"], shuffled)


def test_kvcrush_random_anchor_is_a_seeded_hash_per_layer_and_head():
    method = make_method("kvcrush", budget=8, seed=3)
    bits = torch.zeros(1, 4, 5, dtype=torch.bool)
    anchor = method.anchor_bits(bits, torch.ones(1, 5, dtype=torch.bool), layer=2)
    assert anchor.tolist() == [[bool(hashed_uniform(3, 2, h, 0) < 0.5) for h in range(4)]]


def plain_kvcrush(score, positions, budget, crush_ratio=0.25, recent_ratio=0.5, top_share=0.5, anchor=None):
    """score [H][n] (lists), positions [n]: the positions KVCrush keeps, one token at a time."""
    n, H = len(positions), len(score)
    if n <= budget:
        return sorted(positions)
    crush = int(budget * crush_ratio)
    recent_n = int((budget - crush) * recent_ratio)
    newest = max(positions)
    recent = [p for p in positions if p > newest - recent_n]
    older = [i for i, p in enumerate(positions) if p <= newest - recent_n]
    importance = [sum(score[h][i] for h in range(H)) / H for i in range(n)]
    by_importance = sorted(older, key=lambda i: (-importance[i], -positions[i]))
    heavy = by_importance[:budget - crush - len(recent)]
    pool = by_importance[budget - crush - len(recent):]
    top = int(n * top_share)
    bits = [[False] * n for _ in range(H)]
    for h in range(H):
        for i in sorted(range(n), key=lambda i: (-score[h][i], -positions[i]))[:top]:
            bits[h][i] = True
    distance = {i: sum(bits[h][i] != anchor[h] for h in range(H)) for i in pool}
    ordered = sorted(pool, key=lambda i: (distance[i], positions[i]))
    step = max(1, len(pool) // max(crush, 1))
    representatives = [ordered[j * step] for j in range(crush)] if crush else []
    return sorted(recent + [positions[i] for i in heavy + representatives])


def test_kvcrush_matches_a_plain_restatement_at_prefill_and_decode():
    torch.manual_seed(0)
    for S, budget, anchor in ((40, 16, "alternate"), (25, 12, "ones"), (33, 20, "zeros")):
        # integer-valued scores: many ties, so the tie rules are exercised too
        sums = torch.randint(0, 6, (2, S)).float()
        method = make_method("kvcrush", budget=budget, anchor=anchor)
        bits = {"alternate": [False, True], "ones": [True, True], "zeros": [False, False]}[anchor]
        expected = plain_kvcrush(sums.tolist(), list(range(S)), budget, anchor=bits)
        assert kept(method.keep_mask(prefill_view(sums))) == [expected, expected]
        # a decode step over a cache holding budget + 1 of these, slots shuffled
        positions = sorted(torch.randperm(S)[:budget + 1].tolist())
        order = torch.randperm(budget + 1).tolist()
        st = decode_step(positions, budget, order, H=2)
        score = sums[:, st.key_positions[0, 0]][None]
        scores, _ = method.decode_scores(torch.zeros(1, 2, 1, budget + 1), {"kvcrush_score": score}, st)
        held = st.key_positions[0, 0].tolist()
        plain = plain_kvcrush(score[0].tolist(), held, budget, anchor=bits)
        assert sorted(set(held) - set(evicted(method, scores[:, :1], {}, DecodeStep(
            3, st.positions, st.prompt_lens, st.key_positions[:, :1], st.visible[:, :1], st.budgets)))) == plain


def test_kvcrush_buckets_spread_over_the_sorted_pool():
    # 16 prompt tokens, budget 8: 2 representatives, recent 3 (13-15), 3 heavy hitters (0-2, the
    # highest scores). The pool 3..12 (10 tokens), all with the same bits, sorts by position; buckets
    # of 10 // 2 = 5: the first of each, 3 and 8, stay.
    sums = torch.tensor([[9.0] * 3 + [1.0] * 13] * 2)
    method = make_method("kvcrush", budget=8, anchor="zeros")
    assert kept(method.keep_mask(prefill_view(sums))) == [[0, 1, 2, 3, 8, 13, 14, 15]] * 2


@pytest.mark.parametrize("interval", [0, 3])
def test_kvcrush_holds_the_budget_alike_in_every_head_through_preemption(tiny, interval):
    """Mixed prompt lengths under continuous batching: every (layer, head) holds the budget (and
    grows by up to interval - 1 between cuts), every head of a layer holds the same positions, the
    pool gets every block back, and a recompute after preemption gives the same outputs."""
    budget, steps = 12, 20
    method = make_method("kvcrush", budget=budget, interval=interval)
    counts = {}

    def check(seq, position, cache):
        n = counts.get(seq.id, min(len(seq.prompt_token_ids), budget)) + 1
        counts[seq.id] = n = min(n, budget + (position % interval if interval else 0))
        assert (cache.seqs[seq.id].lengths == n).all(), (seq.id, position)
        for layer in held_positions(cache, seq.id):
            assert all(head == layer[0] for head in layer)

    roomy, held, preemptions, cache = serve(tiny, method, TINY_PROMPTS, 400, steps, on_decode=check)
    assert preemptions == 0 and cache.pool.num_free == cache.pool.usable_blocks
    for lengths, blocks in held:
        assert (lengths == budget).all() or interval and (lengths <= budget + interval - 1).all()
        assert (blocks == (lengths + 3) // 4).all()
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, steps)
    assert tight_preemptions > 0
    assert tight == roomy
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.parametrize("kwargs, message", [
    (dict(crush_ratio=1.0), r"crush_ratio=1.0 .* must be a number in \[0, 1\)"),
    (dict(anchor="median"), r"anchor='median' .* must be one of random, zeros, ones, alternate, mean"),
    (dict(top_share=0), r"top_share=0.0 .* must be a number in \(0, 1\]"),
    (dict(interval=-2), r"interval=-2 .* must be an integer >= 0"),
])
def test_kvcrush_bad_settings_name_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method("kvcrush", budget=16, **kwargs)
