"""CORM, MorphKV and Inf-MLLM (issue 27, wave 4 group a): decode-time evictors. Each on hand-built
attention whose victims are worked out by hand, against a plain restatement of its rule over
many steps, then in the engine under continuous batching with mixed prompt lengths, preemption
and recompute, holding what it promises in real blocks."""

import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.base import DecodeStep, PrefillView
from test_methods_decode_wave2 import TINY_PROMPTS, kept, pointing, serve

inf = float("inf")


def step(position, budget, S, H=1):
    """A DecodeStep for one sequence whose H kv-heads hold positions 0..S-1 in slot order."""
    key_positions = torch.arange(S).expand(1, H, S)
    return DecodeStep(3, torch.tensor([position]), torch.tensor([position]), key_positions,
                      key_positions <= position, torch.tensor([budget]))


def victims(method, scores, st, state):
    """The engine's choices (nanokv/engine/attention.py _evict) for head 0 of sequence 0: as many as
    the head holds over decode_budgets, the lowest scores outside the recent window, oldest first
    among equals."""
    need = int((st.visible.sum(-1) - method.decode_budgets(state, st))[0, 0].clamp(min=0))
    recent = method.recent_window(st.budgets)
    eligible = st.visible & (st.key_positions <= (st.positions - recent)[:, None, None])
    order = sorted((float(s), int(p)) for s, p, e in zip(scores[0, 0], st.key_positions[0, 0], eligible[0, 0]) if e)
    return sorted(p for _, p in order[:need])


def prefill_view(keys, queries):
    return PrefillView(5, 30, queries, keys, torch.arange(keys.shape[1]))


# --- CORM -------------------------------------------------------------------------------------

def test_corm_evicts_the_keys_every_one_of_the_last_w_queries_found_unimportant():
    # 6 slots (positions 0..5), the query at 5 attends to all 6: uniform 1/6 ≈ 0.167; w = 2
    # (queries 4 and 5), r = 2 (positions 4, 5 stay). The field holds position + 1 of each key's
    # newest important query: key 0 was important to query 4 (5), key 1 to query 3 (4), keys 2
    # and 3 to none yet (0: read as the position before their own). Now key 3 draws 0.3 (above),
    # keys 0, 1, 2 draw 0.05, 0.1, 0.15 (below). Key 0 stays (query 4 wanted it), key 3 stays
    # (query 5 wants it); keys 1 and 2 were below for both queries 4 and 5: evicted, though the
    # budget of 6 holds them all.
    corm = make_method("corm", budget=6, window=2, recent_size=2)
    probs = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.2, 0.2]).view(1, 1, 1, 6)
    field = torch.tensor([[[5, 4, 0, 0, 0, 0]]])
    st = step(5, 6, 6)
    scores, state = corm.decode_scores(probs, {"corm_important": field}, st)
    assert state["corm_important"].tolist() == [[[5, 4, 0, 6, 6, 6]]]     # queries 5 wanted 3, 4, 5
    assert scores.tolist() == [[[4, 3, 1, 5, 5, 5]]]                     # the newest important query
    assert victims(corm, scores, st, state) == [1, 2]
    # under a budget of 3 the ceiling takes one more: the key unimportant for longest, key 0
    st3 = step(5, 3, 6)
    assert victims(corm, scores, st3, state) == [0, 1, 2]
    # GQA: a second query head of the group that gives key 1 0.2 (above 1/6) keeps it
    probs2 = torch.cat([probs, torch.tensor([0.1, 0.2, 0.1, 0.2, 0.2, 0.2]).view(1, 1, 1, 6)], dim=2)
    scores, state = corm.decode_scores(probs2, {"corm_important": field}, st)
    assert victims(corm, scores, st, state) == [2]


def test_corm_judges_a_key_only_once_w_queries_have_seen_it():
    # w = 3, r = 1, query at 4: key 2 has been seen by 3 queries (2, 3, 4), key 3 by only 2 (3,
    # 4). No query ever found either important. Key 2 is named, key 3 not yet.
    corm = make_method("corm", budget=10, window=3, recent_size=1)
    probs = torch.tensor([0.6, 0.3, 0.02, 0.02, 0.06]).view(1, 1, 1, 5)   # uniform: 0.2
    st = step(4, 10, 5)
    scores, state = corm.decode_scores(probs, {"corm_important": torch.zeros(1, 1, 5, dtype=torch.long)}, st)
    assert victims(corm, scores, st, state) == [2]


def test_corm_prefill_keeps_what_the_last_w_queries_attended_to_then_the_budget():
    # 8 prompt tokens; query i attends (almost) only to its target: queries 5, 6, 7 (w = 3) point
    # at keys 1, 3, 1. r = 2 keeps 6 and 7. Keys 0..5 have been seen by 3 queries; of them only
    # 1 and 3 were important to one of the last 3: the rule keeps {1, 3, 6, 7}. Under a budget of
    # 3 the newest-important first: 6 and 7 (recent), then key 1 (query 7) over key 3 (query 6).
    keys, queries = pointing([0, 0, 1, 2, 0, 1, 3, 1], 8)
    v = prefill_view(keys, queries)
    assert kept(make_method("corm", budget=100, window=3, recent_size=2).keep_mask(v)) == [[1, 3, 6, 7]]
    assert kept(make_method("corm", budget=3, window=3, recent_size=2).keep_mask(prefill_view(keys, queries))) \
        == [[1, 6, 7]]


def test_corm_names_what_a_plain_history_of_every_query_names():
    """Over 40 queries of random attention (2 kv-heads x 2 query heads), the keys CORM names at each
    step are those a plain loop finds: outside the recent window, seen by at least w queries, and
    below α/t for every query head of the group at each of the last w queries."""
    torch.manual_seed(1)
    N, H, g, w, r, alpha = 40, 2, 2, 4, 3, 1.3
    corm = make_method("corm", budget=1000, window=w, recent_size=r, threshold=alpha)
    logits = torch.randn(N, H, g, N) * 2.5
    field = torch.zeros(1, H, N, dtype=torch.long)
    important = []                                                # [query] -> [H, N] bool
    for q in range(N):
        st = step(q, 1000, N, H)
        probs = logits[q].masked_fill(~st.visible[0, :, None], -inf).softmax(-1)[None]
        _, new = corm.decode_scores(probs, {"corm_important": field}, st)
        field = torch.where(st.visible, new["corm_important"], field)          # as the cache writes
        important.append(((probs[0] >= alpha / (q + 1)).any(dim=1)))
        outside = st.visible & (st.key_positions <= q - r)
        named = corm.named(field, st.key_positions, torch.tensor(q), outside)[0]
        for h in range(H):
            plain = [j for j in range(q - r + 1) if q - j + 1 >= w
                     and not any(bool(important[i][h, j]) for i in range(q - w + 1, q + 1))]
            assert torch.nonzero(named[h]).flatten().tolist() == plain, (q, h)
        assert (corm.decode_budgets({"corm_important": field}, st) == q + 1 - named.sum(-1)).all()


# --- MorphKV ----------------------------------------------------------------------------------

def morph_case():
    # 6 slots, query at 5, R = 2: the window is queries 4 and 5 and tokens 4, 5; the older tokens
    # are 0..3. Softmaxed over 0..3, query 4 gave [0.30, 0.45, 0, 0.25] (its ring row holds the
    # log, plus a constant that must not matter), query 5 gives [0.30, 0, 0.45, 0.25] (half of
    # its attention; the other half on tokens 4 and 5).
    row4 = torch.tensor([0.30, 0.45, 0.0, 0.25, 0.5, 0.5]).log() + 2.0
    probs = torch.tensor([0.15, 0.0, 0.225, 0.125, 0.25, 0.25]).view(1, 1, 1, 6)
    state = {"morphkv_logit0": row4.view(1, 1, 6), "morphkv_logit1": torch.zeros(1, 1, 6)}
    return probs, state


@pytest.mark.parametrize("fusion, scores, victim", [
    # max: [0.30, 0.45, 0.45, 0.25]: token 3, steady but never the favourite, goes
    ("max", [0.30, 0.45, 0.45, 0.25], 3),
    # sum: [0.60, 0.45, 0.45, 0.50]: tokens 1 and 2 each drew one query; the older, 1, goes
    ("sum", [0.60, 0.45, 0.45, 0.50], 1),
])
def test_morphkv_ranks_older_tokens_by_the_window_queries_attention_fused(fusion, scores, victim):
    morph = make_method("morphkv", budget=5, window_size=2, fusion=fusion)
    probs, state = morph_case()
    st = step(5, 5, 6)
    got, new = morph.decode_scores(probs, state, st)
    torch.testing.assert_close(got[0, 0, :4], torch.tensor(scores))
    torch.testing.assert_close(new["morphkv_logit1"], probs[:, :, 0].log())   # query 5's row, at 5 mod 2
    assert victims(morph, got, st, new) == [victim]


def test_morphkv_prefill_keeps_the_window_and_what_its_queries_point_at():
    # 8 prompt tokens, R = 2: queries 6 and 7 point at 1 and 4, so of the older tokens 0..5 those
    # two fill the budget of 4 beside the window {6, 7}
    keys, queries = pointing([0, 0, 1, 2, 3, 4, 1, 4], 8)
    assert kept(make_method("morphkv", budget=4, window_size=2).keep_mask(prefill_view(keys, queries))) \
        == [[1, 4, 6, 7]]


def plain_morph(q_rows, keys, older, fusion):
    """The official formula: logits of each window query summed over its group, softmax over the
    older tokens, max or sum over the window. q_rows [R, Hq, D], keys [H, N, D] -> [H, N]."""
    H, N, D = keys.shape
    rows = torch.stack([torch.einsum("gd,nd->gn", q.view(H, -1, D)[h], keys[h]).sum(0) / math.sqrt(D)
                        for q in q_rows for h in range(H)]).view(len(q_rows), H, N)
    probs = rows.masked_fill(~older, -inf).softmax(-1)
    return probs.amax(0) if fusion == "max" else probs.sum(0)


@pytest.mark.parametrize("fusion", ["max", "sum"])
def test_morphkv_decode_scores_are_the_official_formula_after_a_ring_of_steps(fusion):
    """A 12-token prompt, then 14 decode steps (2 kv-heads x 2 query heads, R = 4): at every step
    the scores of the older tokens equal the official formula on the real logits of the last 4
    queries, though the ring holds log-probabilities (prefill: logits)."""
    torch.manual_seed(2)
    P, N, H, D, R = 12, 26, 2, 8, 4
    keys, queries = torch.randn(H, N, D), torch.randn(N, 2 * H, D)
    morph = make_method("morphkv", budget=9, window_size=R, fusion=fusion)
    view = PrefillView(0, 2, queries[:P], keys[:, :P], torch.arange(P))
    state = {k: torch.cat([v, torch.zeros(H, N - P)], 1)[None] for k, v in morph.prefill_state(view).items()}
    older = torch.arange(P) <= P - 1 - R
    torch.testing.assert_close(morph.scores(view)[:, :P - R], plain_morph(queries[P - R:P], keys[:, :P], older, fusion)[:, :P - R])
    for q in range(P, N):
        st = step(q, 9, N, H)
        logits = torch.einsum("hgd,hnd->hgn", queries[q].view(H, 2, D), keys) / math.sqrt(D)
        probs = logits.masked_fill(~st.visible[0, :, None], -inf).softmax(-1)[None]
        scores, new = morph.decode_scores(probs, state, st)
        state = {k: torch.where(st.visible, new[k], state[k]) for k in state}   # as the cache writes
        older = torch.arange(N) <= q - R
        expected = plain_morph(queries[q - R + 1:q + 1], keys, older.expand(H, N), fusion)
        torch.testing.assert_close(scores[0][:, older], expected[:, older], rtol=1e-5, atol=1e-6)


# --- Inf-MLLM ---------------------------------------------------------------------------------

def test_inf_mllm_sums_the_last_r_queries_attention_and_forgets_the_one_before():
    # 6 slots, query at 5, R = 2 (ring field 1 holds query 3's row until query 5 overwrites it).
    # Query 3 gave token 2 a lot (0.9) but it is out of the window now; query 4 gave
    # [0.1, 0.5, 0.1, 0.3], query 5 gives [0.4, 0.0, 0.1, 0.1]: sums [0.5, 0.5, 0.2, 0.4], so
    # token 2 goes, the saddle 1 (held by query 4) and 0 (by query 5) stay.
    inf_mllm = make_method("inf_mllm", budget=5, window_size=2)
    row3 = torch.tensor([0.0, 0.0, 0.9, 0.1, 0.0, 0.0]).view(1, 1, 6)
    row4 = torch.tensor([0.1, 0.5, 0.1, 0.3, 0.0, 0.0]).view(1, 1, 6)
    probs = torch.tensor([0.4, 0.0, 0.1, 0.1, 0.2, 0.2]).view(1, 1, 1, 6)
    st = step(5, 5, 6)
    scores, new = inf_mllm.decode_scores(probs, {"infmllm_attn0": row4, "infmllm_attn1": row3}, st)
    torch.testing.assert_close(scores[0, 0, :4], torch.tensor([0.5, 0.5, 0.2, 0.4]))
    assert victims(inf_mllm, scores, st, new) == [2]


def test_inf_mllm_prefill_keeps_the_recent_tokens_and_the_saddles():
    # R = 3: queries 5, 6, 7 point at 2, 1, 1; older tokens 0..4: token 1 drew 2, token 2 drew 1
    keys, queries = pointing([0, 0, 1, 2, 0, 2, 1, 1], 8)
    assert kept(make_method("inf_mllm", budget=5, window_size=3).keep_mask(prefill_view(keys, queries))) \
        == [[1, 2, 5, 6, 7]]


def test_inf_mllm_scores_are_a_plain_windowed_sum_over_a_ring_of_steps():
    torch.manual_seed(3)
    P, N, H, R = 7, 24, 2, 5
    keys, queries = torch.randn(H, N, 8), torch.randn(N, 2 * H, 8)
    inf_mllm = make_method("inf_mllm", budget=8, window_size=R)
    view = PrefillView(0, 2, queries[:P], keys[:, :P], torch.arange(P))
    state = {k: torch.cat([v, torch.zeros(H, N - P)], 1)[None] for k, v in inf_mllm.prefill_state(view).items()}
    attention = []                                                  # [query] -> [H, N] group mean
    for q in range(N):
        logits = torch.einsum("hgd,hnd->hgn", queries[q].view(H, 2, 8), keys) / math.sqrt(8)
        attention.append(logits.masked_fill(torch.arange(N) > q, -inf).softmax(-1).mean(1))
    for q in range(P, N):
        st = step(q, 8, N, H)
        probs = torch.einsum("hgd,hnd->hgn", queries[q].view(H, 2, 8), keys) / math.sqrt(8)
        probs = probs.masked_fill(~st.visible[0, :, None], -inf).softmax(-1)[None]
        scores, new = inf_mllm.decode_scores(probs, state, st)
        state = {k: torch.where(st.visible, new[k], state[k]) for k in state}
        older = torch.arange(N) <= q - R
        expected = sum(attention[i] for i in range(q - R + 1, q + 1))
        torch.testing.assert_close(scores[0][:, older], expected[:, older])


# --- the engine -------------------------------------------------------------------------------

ENGINE_CASES = {
    "morphkv": dict(window_size=4),
    "morphkv-sum": dict(window_size=4, fusion="sum"),
    "inf_mllm": dict(window_size=4),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_mixed_prompts_hold_the_budget_in_real_blocks_through_preemption(tiny, case):
    """Continuous batching of prompts shorter and longer than the budget: every (layer, head)
    ends holding the budget, in the budget's blocks, and the pool gets every block back; with too
    few blocks sequences are preempted and recomputed (replaying their evictions, the ring of the
    last R queries included) and every output is as with room to spare."""
    method = make_method(case.split("-")[0], budget=12, **ENGINE_CASES[case])
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    assert preemptions == 0
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0
    assert tight == roomy
    for lengths, blocks in held:  # every prompt + 20 tokens is past the budget
        assert (lengths == 12).all() and (blocks == 3).all()
    assert cache.pool.num_free == cache.pool.usable_blocks


def test_corm_holds_at_most_the_budget_and_what_its_rule_leaves_through_preemption(tiny):
    """CORM in the engine: every head, after every step, holds at most the budget, and at least
    one holds less (the rule evicts below the ceiling); blocks follow the lengths; preempted
    sequences recompute to the same tokens and the pool gets every block back."""
    # α = 0.5 names some keys but not most: heads end between 10 and 12, tight enough to preempt
    method = make_method("corm", budget=12, window=3, recent_size=3, threshold=0.5)
    lengths_seen = []
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20,
                                        on_decode=lambda s, p, c: lengths_seen.append(c.seqs[s.id].lengths.clone()))
    assert preemptions == 0
    assert all((lengths <= 12).all() for lengths in lengths_seen)
    assert any((lengths < 12).any() for lengths, _ in held)
    for lengths, blocks in held:
        assert (lengths <= 12).all() and (blocks == (lengths + 3) // 4).all()
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0
    assert tight == roomy
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, kwargs, message", [
    ("corm", dict(window=0), r"window=0 .* an integer >= 1"),
    ("corm", dict(recent_size=-1), r"recent_size=-1 .* an integer >= 0"),
    ("corm", dict(threshold=0.0), r"threshold=0.0 .* a number > 0"),
    ("morphkv", dict(fusion="mean"), r"fusion='mean' .* 'max' or 'sum'"),
    ("morphkv", dict(window_size=0), r"window_size=0 .* an integer >= 1"),
    ("morphkv", dict(budget=32), r"budget=32 must exceed window_size=32"),
    ("inf_mllm", dict(window_size=-2), r"window_size=-2 .* an integer >= 1"),
    ("inf_mllm", dict(budget=4, window_size=8), r"budget=4 must exceed window_size=8"),
])
def test_bad_settings_name_the_valid_values(kind, kwargs, message):
    kwargs.setdefault("budget", 64)
    with pytest.raises(ValueError, match=message):
        make_method(kind, **kwargs)
