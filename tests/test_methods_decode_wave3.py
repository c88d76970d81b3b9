"""Decode-time scorers that read the cache itself: VATP (value norms) and R-KV (key redundancy).
Each on hand-built inputs whose victim is known by hand, the framework's reads of keys and
values from the pool, then in the engine: under continuous batching with mixed prompt lengths,
preemption and recompute, holding its budget in real blocks."""

import pytest
import torch

from helpers import held_positions
from nanokv.methods import make_method
from nanokv.methods.base import DecodeStep, PrefillView
from nanokv.methods.r_kv import pooled_in_position_order, redundancy
from test_methods_decode_wave2 import TINY_PROMPTS, serve

inf = float("inf")


def step(position, budget, S, **reads):
    """A DecodeStep for one sequence of one kv-head whose slots hold positions 0..S-1 in order."""
    key_positions = torch.arange(S).expand(1, 1, S)
    return DecodeStep(3, torch.tensor([position]), torch.tensor([position]), key_positions,
                      key_positions <= position, torch.tensor([budget]), **reads)


def victim(method, scores, st):
    """The engine's choice (nanokv/engine/attention.py _evict): the lowest score among the visible
    slots outside the recent window, the oldest among equals."""
    recent = method.recent_window(st.budgets)
    eligible = st.visible & (st.key_positions <= (st.positions - recent)[:, None, None])
    scores = scores.masked_fill(~eligible, inf)
    lowest = scores == scores.min(dim=-1, keepdim=True).values
    return int(st.key_positions.masked_fill(~lowest | ~eligible, 1 << 30).argmin(dim=-1))


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


# --- VATP -------------------------------------------------------------------------------------

def values_with_l1(norms, D=2):
    """[1, 1, S, D] values whose L1 norms are `norms` (split evenly over D signed channels)."""
    v = torch.tensor(norms, dtype=torch.float32)[:, None].expand(-1, D) / D
    return (v * torch.tensor([1.0, -1.0] * (D // 2)))[None, None]


def test_vatp_evicts_the_smaller_value_norm_among_equal_attention_and_keeps_the_sinks():
    # 8 slots, budget 6, 2 recent (6, 7), 1 sink (0). Slots 1-5 have the same accumulated
    # attention (1); their value norms are 2, 1, 3, 3, 3. The sink has none and a tiny value.
    # H2O evicts the sink (lowest attention); among 1-5 it would take the oldest, 1. VATP keeps
    # the sink and evicts slot 2, the smaller norm, though it is newer.
    probs = torch.zeros(1, 1, 1, 8)
    probs[..., 7] = 1.0                                       # the query looks at itself (recent)
    attention = torch.tensor([[[0.0, 1, 1, 1, 1, 1, 0, 0]]])
    st = step(7, 6, 8, values=values_with_l1([0.01, 2, 1, 3, 3, 3, 5, 5]))
    vatp = make_method("vatp", budget=6, recent_ratio=0.34, sink_size=1)
    scores, state = vatp.decode_scores(probs, {"vatp_attention": attention}, st)
    torch.testing.assert_close(state["vatp_attention"], attention + probs[:, :, 0])   # the plain sum
    torch.testing.assert_close(scores[0, 0, 1:], torch.tensor([2.0, 1, 3, 3, 3, 0, 5]))
    assert scores[0, 0, 0] == inf
    assert victim(vatp, scores, st) == 2
    h2o = make_method("h2o", budget=6, recent_ratio=0.34)
    assert victim(h2o, h2o.decode_scores(probs, {"h2o_score": attention}, st)[0], st) == 0
    # no sink: the sink's tiny value makes it the victim
    nosink = make_method("vatp", budget=6, recent_ratio=0.34, sink_size=0)
    assert victim(nosink, nosink.decode_scores(probs, {"vatp_attention": attention}, st)[0], st) == 0


def test_vatp_prefill_keeps_sinks_recent_then_the_highest_attention_times_value_norm():
    # 8 prompt tokens, budget 5: 2 recent (6, 7), 2 sinks (0, 1), then the best attention x ‖v‖₁:
    # token 2: 3 x 1 = 3, 3: 1 x 4 = 4, 4: 2 x 1 = 2, 5: 0.5 x 10 = 5 -> token 5
    column_sums = torch.tensor([[9.0, 0.1, 3, 1, 2, 0.5, 1, 1]])
    v = PrefillView(4, 30, torch.zeros(8, 1, 2), torch.zeros(1, 8, 2), torch.arange(8), column_sums,
                    values=values_with_l1([0.01, 0.01, 1, 4, 1, 10, 1, 1])[0])
    method = make_method("vatp", budget=5, recent_ratio=0.4, sink_size=2)
    assert kept(method.keep_mask(v)) == [[0, 1, 5, 6, 7]]
    assert make_method("vatp").sink_size == 20               # the official README's --sink_len 20
    assert torch.equal(method.prefill_state(v)["vatp_attention"], column_sums)
    # by attention alone (H2O) tokens 0 (9), 2 (3) and 4 (2) would win
    assert kept(make_method("h2o", budget=5, recent_ratio=0.4).keep_mask(v)) == [[0, 2, 4, 6, 7]]


# --- R-KV -------------------------------------------------------------------------------------

def dup_keys():
    """8 keys: 0, 4, 5, 6, 7 distinct (orthogonal), 1, 2, 3 the same key (in scale 1, 2, 3)."""
    keys = torch.eye(8)[[0, 1, 1, 1, 2, 3, 4, 5]] * torch.tensor([1.0, 1, 2, 3, 1, 1, 1, 1])[:, None]
    return keys


def test_r_kv_redundancy_counts_copies_but_spares_each_rows_newest_near_duplicate():
    # copies 1, 2, 3 (cosine 1). Row 1 drops 3 (its newest copy), row 2 drops 3, row 3 drops 2:
    # column 1 keeps rows 2, 3 (sum 2), column 2 keeps row 1 (1), column 3 none; over 8 keys
    keys, positions, held = dup_keys()[None], torch.arange(8)[None], torch.ones(1, 8, dtype=torch.bool)
    mean = torch.tensor([0.0, 2, 1, 0, 0, 0, 0, 0]) / 8
    torch.testing.assert_close(redundancy(keys, positions, held, 0.5)[0], mean.softmax(-1))
    # the same in any slot order: shuffle the slots
    perm = torch.tensor([5, 3, 0, 7, 1, 6, 2, 4])
    torch.testing.assert_close(redundancy(keys[:, perm], positions[:, perm], held, 0.5)[0], mean.softmax(-1)[perm])
    # a slot that is not held counts for nothing: hide copy 3, then 1 and 2 each drop the other
    partial = held.clone()
    partial[0, 3] = False
    r = redundancy(keys, positions, partial, 0.5)[0]
    assert r[3] == 0
    torch.testing.assert_close(r[[0, 1, 2, 4]], torch.full((4,), 1 / 7))


def test_r_kv_evicts_the_oldest_copy_before_a_distinct_key_of_equal_attention():
    # equal attention everywhere; budget 6, α = 2 (6, 7 recent). Without redundancy (λ = 1) the
    # tie goes to the oldest, slot 0; with it, the most redundant: the oldest copy, slot 1
    method = make_method("r_kv", budget=6, window_size=2, kernel_size=1)
    probs = torch.full((1, 1, 2, 8), 1 / 8)                     # two query heads in the group
    state = {name: torch.full((1, 1, 8), 1 / 8) for name in method.slot_fields}
    st = step(7, 6, 8, keys=dup_keys()[None, None])
    scores, new = method.decode_scores(probs, state, st)
    assert victim(method, scores, st) == 1
    plain = make_method("r_kv", budget=6, window_size=2, kernel_size=1, mix_lambda=1.0)
    assert victim(plain, plain.decode_scores(probs, state, st)[0], st) == 0
    # and the score is λ·I − (1−λ)·R by hand
    r = (torch.tensor([0.0, 2, 1, 0, 0, 0, 0, 0]) / 8).softmax(-1)
    torch.testing.assert_close(scores[0, 0], 0.07 / 8 - 0.93 * r)


def test_r_kv_importance_is_the_group_max_over_the_last_queries_pooled_in_position_order():
    method = make_method("r_kv", budget=9, window_size=2, kernel_size=3)
    # the query at position 9 writes ring field 9 % 2 = 1; field 0 holds the query before it
    probs = torch.zeros(1, 1, 2, 6)
    probs[0, 0, 0, 2] = 0.2
    probs[0, 0, 1, 2] = 0.6                                     # the group's max: 0.6
    old = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.4, 0.0]]])
    state = {"rkv_attention0": old, "rkv_attention1": torch.full((1, 1, 6), 7.0)}
    positions = torch.tensor([[[3, 0, 5, 1, 4, 2]]])            # slots out of position order
    st = DecodeStep(0, torch.tensor([9]), torch.tensor([6]), positions, torch.ones(1, 1, 6, dtype=torch.bool),
                    torch.tensor([5]), keys=torch.randn(1, 1, 6, 4))   # 6 held > budget 5: scored
    scores, new = method.decode_scores(probs, state, st)
    assert torch.equal(new["rkv_attention0"], old)
    assert new["rkv_attention1"][0, 0].tolist() == pytest.approx([0, 0, 0.6, 0, 0, 0])
    # mean of the two rows by slot: positions 3: 0, 0: 0, 5: 0.3, 1: 0, 4: 0.2, 2: 0. Pooled over
    # position neighbours (kernel 3): 0: 0, 1: 0, 2: 0, 3: 0.2, 4: 0.3, 5: 0.3
    pooled = pooled_in_position_order((new["rkv_attention0"] + new["rkv_attention1"])[0] / 2, positions[0],
                                      torch.ones(1, 6, dtype=torch.bool), 3)
    assert pooled[0].tolist() == pytest.approx([0.2, 0, 0.3, 0, 0.3, 0])
    r = redundancy(st.keys[0], positions[0], st.visible[0], 0.5)
    torch.testing.assert_close(scores[0], 0.07 * pooled - 0.93 * r)
    # a slot that is not held (position 4) neither pools nor is pooled: 3 and 5 become neighbours
    held = torch.tensor([[True, True, True, True, False, True]])
    assert pooled_in_position_order(torch.tensor([[0.0, 0, 0.3, 0, 0.9, 0]]), positions[0], held, 3)[0].tolist() \
        == pytest.approx([0.3, 0, 0.3, 0, 0, 0])


def test_r_kv_under_budget_leaves_scores_alone_and_only_moves_the_ring():
    method = make_method("r_kv", budget=9, window_size=2)
    probs = torch.full((1, 1, 1, 6), 1 / 6)
    state = {name: torch.zeros(1, 1, 6) for name in method.slot_fields}
    st = step(5, 9, 6)                                          # no keys given: none are read
    scores, new = method.decode_scores(probs, state, st)
    assert (scores == 0).all() and (new["rkv_attention1"] == 1 / 6).all() and (new["rkv_attention0"] == 0).all()


def test_r_kv_prefill_drops_the_old_copies_of_a_repeated_key():
    # uniform attention (zero queries): every key older than the last α queries gets the same
    # importance, so redundancy decides: of the copies 1, 2, 3 the two oldest go
    keys = dup_keys()[None] * 5
    v = PrefillView(2, 30, torch.zeros(8, 2, 8), keys, torch.arange(8))
    method = make_method("r_kv", budget=6, window_size=2)
    assert kept(method.keep_mask(v)) == [[0, 3, 4, 5, 6, 7]]
    state = method.prefill_state(v)
    # query 7 (ring 1) and query 6 (ring 0): uniform over the keys each sees
    torch.testing.assert_close(state["rkv_attention1"][0], torch.full((8,), 1 / 8))
    torch.testing.assert_close(state["rkv_attention0"][0], torch.tensor([1 / 7] * 7 + [0.0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vatp", budget=20), "budget=20 must exceed sink_size=20"),
    (dict(name="vatp", budget=4, sink_size=4), "budget=4 must exceed sink_size=4"),
    (dict(name="vatp", sink_size=-1), r"sink_size=-1 .* integer >= 0"),
    (dict(name="r_kv", budget=8), "budget=8 must exceed window_size=8"),
    (dict(name="r_kv", kernel_size=4), "kernel_size=4 .* odd integer"),
    (dict(name="r_kv", mix_lambda=1.5), r"mix_lambda=1.5 .* in \[0, 1\]"),
    (dict(name="r_kv+kivi"), "r_kv evicts during decode"),
])
def test_bad_settings_name_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(**kwargs)


# --- in the engine ----------------------------------------------------------------------------

def test_the_cache_hands_keys_and_values_in_slot_order_only_to_a_method_that_reads_them(tiny):
    """DecodeStep.keys / .values are the pool's K and V of each slot the probabilities cover;
    PrefillView.values the prompt's V; a method that reads nothing gets None."""
    seen = []

    class Spy(type(make_method("h2o", budget=12))):
        name = "spy"
        needs_values = True
        decode_reads = frozenset({"keys", "values"})

        def scores(self, view):
            seen.append(("prefill", view.values.clone(), view.keys.clone()))
            return super().scores(view)

        def decode_scores(self, probs, state, step):
            seen.append(("decode", step.keys.clone(), step.values.clone(), step.visible.clone()))
            return super().decode_scores(probs, state, step)

    _, _, _, cache = serve(tiny, Spy(budget=12), TINY_PROMPTS[2:3], 100, 3)
    prefill = [s for s in seen if s[0] == "prefill"]
    decode = [s for s in seen if s[0] == "decode"]
    assert prefill and decode
    for _, values, keys in prefill:
        assert values.shape == keys.shape and values.shape[1] == 20 and not torch.equal(values, keys)
    for _, keys, values, visible in decode:
        assert keys.shape == values.shape == (*visible.shape, cache.pool.head_dim)
        assert keys[visible].abs().sum() > 0 and not torch.equal(keys[visible], values[visible])

    class Plain(type(make_method("h2o", budget=12))):
        def decode_scores(self, probs, state, step):
            assert step.keys is None and step.values is None
            return super().decode_scores(probs, state, step)

    serve(tiny, Plain(budget=12), TINY_PROMPTS[2:3], 100, 3)


ENGINE_CASES = {"vatp": dict(sink_size=2), "r_kv": dict(window_size=4)}


@pytest.mark.parametrize("kind", list(ENGINE_CASES))
def test_mixed_prompts_hold_the_budget_in_real_blocks_through_preemption(tiny, kind):
    """Continuous batching of prompts shorter and longer than the budget: every (layer, head)
    ends holding the budget, in the budget's blocks, and the pool gets every block back; with
    too few blocks sequences are preempted and recomputed (replaying their evictions) and every
    output is as with room to spare (see test_methods_decode_wave2.py)."""
    method = make_method(kind, budget=12, **ENGINE_CASES[kind])
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    assert preemptions == 0
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0
    assert tight == roomy
    for lengths, blocks in held:  # every prompt + 20 tokens is past the budget
        assert (lengths == 12).all() and (blocks == 3).all()
    assert cache.pool.num_free == cache.pool.num_blocks


@pytest.mark.slow
def test_each_head_keeps_its_sinks_or_its_last_tokens_in_the_engine(smollm2_gguf):
    """A short real-model run per method: VATP holds positions 0..sink_size-1 in every head, R-KV
    the last α positions, both at exactly the budget."""
    from nanokv import LLM, SamplingParams

    prompt = [100 + (j * 13) % 5000 for j in range(40)]
    for kind, options, must in (("vatp", dict(sink_size=4), range(4)), ("r_kv", dict(window_size=8), None)):
        llm = LLM(str(smollm2_gguf), dtype="float32", method=kind, budget=24, **options)
        held, finish = [], llm.scheduler.finish

        def capture(seq):
            held.extend(set(h) for layer in held_positions(llm.cache, seq.id) for h in layer)
            finish(seq)

        llm.scheduler.finish = capture
        [out] = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))
        last = len(prompt) + 6 - 1                              # the last token is not cached
        must = set(must) if must is not None else set(range(last - 8, last))
        assert all(len(h) == 24 for h in held) and all(must <= h for h in held), kind
        assert len(set(map(frozenset, held))) > 1, kind         # heads choose differently
