"""Decode-time scorers that read the cache itself: VATP (value norms) and R-KV (key redundancy).
Each on hand-built inputs whose victim is known by hand, the framework's reads of keys and
values from the pool, then in the engine: under continuous batching with mixed prompt lengths,
preemption and recompute, holding its budget in real blocks."""

import math

import pytest
import torch

from helpers import held_positions
from nanokv.methods import make_method
from nanokv.methods.base import DecodeEvictor, DecodeStep, Merger, PrefillView, hashed_uniform
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
    # zero queries: equal logits everywhere; budget 6, α = 2 (6, 7 the window). Without
    # redundancy (λ = 1) the tie goes to the oldest, slot 0; with it, the most redundant: the
    # oldest copy, slot 1
    method = make_method("r_kv", budget=6, window_size=2, kernel_size=1)
    probs = torch.full((1, 1, 2, 8), 1 / 8)                     # two query heads in the group
    state = {name: torch.zeros(1, 1, 8) for name in method.slot_fields}
    st = step(7, 6, 8, keys=dup_keys()[None, None], queries=torch.zeros(1, 2, 8))
    scores, new = method.decode_scores(probs, state, st)
    assert victim(method, scores, st) == 1
    plain = make_method("r_kv", budget=6, window_size=2, kernel_size=1, mix_lambda=1.0)
    assert victim(plain, plain.decode_scores(probs, state, st)[0], st) == 0
    # and the score of the prefix (0..5) is λ·I − (1−λ)·R by hand, I uniform over the prefix
    r = (torch.tensor([0.0, 2, 1, 0, 0, 0, 0, 0]) / 8).softmax(-1)
    torch.testing.assert_close(scores[0, 0, :6], 0.07 / 6 - 0.93 * r[:6])


def pointing_step(S, position, budget, group=2, D=None):
    """One kv-head whose key j is e_j, with a query to fill in; slots hold positions 0..S-1."""
    D = D or S
    return step(position, budget, S, keys=torch.eye(S, D)[None, None], queries=torch.zeros(1, group, D))


def test_r_kv_importance_is_the_group_max_of_the_logits_into_a_ring_of_the_last_queries():
    method = make_method("r_kv", budget=7, window_size=2, kernel_size=1, mix_lambda=1.0)
    st = pointing_step(9, 8, 7)                                 # 9 held > 7: scored; prefix 0..6
    # the query at position 8 writes ring field 8 % 2 = 0; field 1 holds the query at 7. Its
    # heads point at keys 2 (logit 4) and 3 (logit -4, but 2 in the other head): max 4 and 2
    st.queries[0, 0, 2], st.queries[0, 0, 3] = 4 * 3.0, -4 * 3.0    # / sqrt(D = 9)
    st.queries[0, 1, 3] = 2 * 3.0
    old = torch.tensor([[[0.0, 1, 0, 0, 0, 0, 0, 0, 0]]])
    state = {"rkv_logit0": torch.full((1, 1, 9), 7.0), "rkv_logit1": old}
    scores, new = method.decode_scores(torch.zeros(1, 1, 2, 9), state, st)
    assert torch.equal(new["rkv_logit1"], old)
    torch.testing.assert_close(new["rkv_logit0"][0, 0], torch.tensor([0.0, 0, 4, 2, 0, 0, 0, 0, 0]))
    # softmax of each row over the prefix keys 0..6, then the mean of the two rows
    prefix = torch.arange(9) <= 6
    rows = torch.stack([new["rkv_logit0"][0, 0], old[0, 0]])[:, prefix].softmax(-1)
    torch.testing.assert_close(scores[0, 0, :7], rows.mean(0))


def test_r_kv_under_budget_leaves_scores_alone_and_only_moves_the_ring():
    method = make_method("r_kv", budget=9, window_size=2)
    st = pointing_step(6, 5, 9, group=1)
    st.queries[0, 0, 1] = 6.0
    state = {name: torch.zeros(1, 1, 6) for name in method.slot_fields}
    scores, new = method.decode_scores(torch.zeros(1, 1, 1, 6), state, st)
    assert (scores == 0).all() and (new["rkv_logit0"] == 0).all()
    assert new["rkv_logit1"][0, 0].tolist() == pytest.approx([0, 6 / 6 ** 0.5, 0, 0, 0, 0])


def test_r_kv_prefill_drops_the_old_copies_of_a_repeated_key():
    # zero queries: every key of the prefix (0..5) gets the same importance, so redundancy
    # decides: of the copies 1, 2, 3 the two oldest go
    keys = dup_keys()[None] * 5
    v = PrefillView(2, 30, torch.zeros(8, 2, 8), keys, torch.arange(8))
    method = make_method("r_kv", budget=6, window_size=2)
    assert kept(method.keep_mask(v)) == [[0, 3, 4, 5, 6, 7]]
    state = method.prefill_state(v)
    assert set(state) == {"rkv_logit0", "rkv_logit1"} and all((x == 0).all() for x in state.values())
    # a query's logits over the keys it sees, 0 over later ones (query 6 in field 0 sees 0..6)
    queries = torch.ones(8, 2, 8)
    queries[6, 1] = 2.0                                       # the group's max
    state = method.prefill_state(PrefillView(2, 30, queries, keys, torch.arange(8)))
    torch.testing.assert_close(state["rkv_logit0"][0], torch.tensor([1, 1, 2, 3, 1, 1, 1, 0]) * 5 * 2 / 8 ** 0.5)
    torch.testing.assert_close(state["rkv_logit1"][0], torch.tensor([1, 1, 2, 3, 1, 1, 1, 1]) * 5 / 8 ** 0.5)


def test_r_kv_pooling_never_reads_the_window():
    # the window (7, 8) holds a spike: the current query points at key 7 (logit 30) and so did the
    # last one. The window's keys are left out of the softmax and the pooling, so the prefix
    # 0..6 is uniform; pooling into the window would raise 4, 5, 6 (kernel 7) to the spike
    method = make_method("r_kv", budget=7, window_size=2, mix_lambda=1.0)
    st = pointing_step(9, 8, 7)
    st.queries[0, :, 7] = 30 * 3.0
    spike = torch.zeros(1, 1, 9)
    spike[..., 7] = 30.0
    scores, _ = method.decode_scores(torch.zeros(1, 1, 2, 9), {"rkv_logit0": spike, "rkv_logit1": spike}, st)
    torch.testing.assert_close(scores[0, 0, :7], torch.full((7,), 1 / 7))


def official_r1kv_scores(queries, keys, window, kernel, mix_lambda):
    """R1KV.update_kv's final_score (Zefan-Cai/R-KV @ d15c976, r1_kv.py 49-77 with
    utils.compute_attention_scores and cal_similarity), restated: queries [α, Hq, D], keys
    [H, S, D] in position order -> [H, S - α] over the prefix."""
    H, S, D = keys.shape
    q = queries.permute(1, 0, 2)[None]                                        # [1, Hq, α, D]
    k = keys[None]
    attn = torch.matmul(q.view(1, H, -1, window, D), k.unsqueeze(2).transpose(3, 4)) / math.sqrt(D)
    attn = attn.max(dim=2).values                                             # [1, H, α, S]
    weights = torch.softmax(attn[:, :, -window:, :-window], dim=-1, dtype=torch.float32).mean(dim=-2)
    pooled = torch.nn.functional.max_pool1d(weights, kernel_size=kernel, padding=kernel // 2, stride=1)
    unit = k[0] / (k[0].norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    for h in range(H):
        sim[h].fill_diagonal_(0.0)
    idx = torch.where(sim > 0.5, torch.arange(S), torch.zeros_like(sim, dtype=torch.long))
    last = idx.max(dim=-1).values
    sim[torch.arange(H)[:, None], torch.arange(S)[None, :], last] = 0
    similarity = sim.mean(dim=1).softmax(dim=-1)[:, :-window]
    return (pooled * mix_lambda - similarity * (1 - mix_lambda))[0]


def test_r_kv_scores_are_the_official_formula_at_prefill_and_after_a_ring_of_decode_steps():
    torch.manual_seed(0)
    H, G, S, D, window = 2, 3, 24, 16, 4
    base = torch.randn(H, S // 2, D)                    # keys in near-copy pairs: every row has a
    keys = base.repeat_interleave(2, dim=1) + 0.1 * torch.randn(H, S, D)   # near-duplicate
    queries = torch.randn(S, H * G, D) * 2
    method = make_method("r_kv", budget=12, window_size=window)
    official = official_r1kv_scores(queries[-window:], keys, window, 7, 0.07)
    ours = method.scores(PrefillView(1, 4, queries, keys, torch.arange(S)))
    torch.testing.assert_close(ours[:, :-window], official)
    assert (ours[:, -window:] == inf).all()
    # at decode: the last α queries one step each, slots in any order
    perm = torch.randperm(S)
    k_pos = perm.expand(1, H, S)
    state = {name: torch.zeros(1, H, S) for name in method.slot_fields}
    for position in range(S - window, S):
        st = DecodeStep(1, torch.tensor([position]), torch.tensor([S - window]), k_pos, k_pos <= position,
                        torch.tensor([12]), keys=keys[:, perm][None], queries=queries[position][None])
        scores, new = method.decode_scores(torch.zeros(1, H, G, S), state, st)
        state = {name: torch.where(st.visible, new[name], state[name]) for name in state}   # as the engine
    prefix = perm < S - window
    torch.testing.assert_close(scores[0][:, prefix], official[:, perm[prefix]])


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
    assert cache.pool.num_free == cache.pool.usable_blocks


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


def test_r_kv_divide_length_grows_the_cache_and_cuts_it_back_every_d_positions(tiny):
    """divide_length=128, the official schedule: each head holds budget..budget+127 and drops back
    to the budget at the step whose query sits at a multiple of 128 (the official code's
    self.length % 128 == 0); under preemption every request still ends, with the same tokens."""
    B, D = 16, 128
    method = make_method("r_kv", budget=B, window_size=4, divide_length=D)
    seen = {}

    def record(seq, position, cache):
        seen.setdefault(tuple(seq.prompt_token_ids), []).append((position, cache.seqs[seq.id].lengths.clone()))

    def check(prompt):
        held, expected = min(len(prompt), B), []
        for position, lengths in seen.pop(tuple(prompt)):
            held = min(held + 1, B + position % D)
            expected.append(held)
            assert (lengths == held).all(), (len(prompt), position)
        return expected

    long = TINY_PROMPTS[2]                                      # 20 tokens: cut to 16 at prefill
    # 320 blocks for the request, one the engine sets aside as its scratch (cache.reserve_scratch)
    [out], _, _, _ = serve(tiny, method, [long], 321, 300, max_length=400, on_decode=record)
    expected = check(long)
    assert len(out) == 300 and max(expected) == B + D - 1 and expected[-1] > B
    # three requests (two shorter than the budget) in a pool that holds one whole but not three
    # growing together: one is preempted and recomputed (its cuts replayed), and all end alike
    prompts = [long, TINY_PROMPTS[0], TINY_PROMPTS[4]]
    roomy = serve(tiny, method, prompts, 1000, 150, on_decode=record)[0]
    assert all(B in check(prompt) for prompt in prompts)
    tight, _, preemptions, cache = serve(tiny, method, prompts, 300, 150)
    assert preemptions > 0
    assert tight == roomy and all(len(out) == 150 for out in tight)
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- several evictions in one step ------------------------------------------------------------

class HashedScore(DecodeEvictor):
    """Each token's score is a fixed draw per (layer, head, position); the newest 2 stay."""
    name = "hashed"

    def recent_window(self, budget):
        return torch.full_like(budget, 2)

    def scores(self, view):
        heads = torch.arange(view.keys.shape[0])[:, None]
        return self.protect_recent(hashed_uniform(0, view.layer, heads, view.positions[None]))

    def decode_scores(self, probs, state, step):
        heads = torch.arange(step.visible.shape[1])[None, :, None]
        return hashed_uniform(0, step.layer, heads, step.key_positions), {}


class HashedInWaves(HashedScore):
    """The same scores; the cache grows by 7 and is cut back to the budget every 8 positions."""

    def decode_budgets(self, state, step):
        return super().decode_budgets(state, step) + (step.positions % 8)[:, None]


def test_evicting_several_in_one_step_keeps_what_evicting_one_a_step_keeps(tiny):
    """With fixed scores, evicting one token a step keeps the best of all the tokens seen; so does
    cutting several at once, so at each cut both hold the same positions in every head."""
    held = {}

    def record(kind):
        def at(seq, position, cache):
            if position % 8 == 0:
                held[kind, tuple(seq.prompt_token_ids), position] = held_positions(cache, seq.id)
        return at

    for kind, method in (("one", HashedScore(budget=12)), ("waves", HashedInWaves(budget=12))):
        serve(tiny, method, TINY_PROMPTS[:5], 400, 40, on_decode=record(kind))
    cuts = [key[1:] for key in held if key[0] == "waves"]
    assert len(cuts) >= 15
    for prompt, position in cuts:
        assert held["waves", prompt, position] == held["one", prompt, position], (len(prompt), position)
        if position >= 12:
            assert all(len(h) == 12 for layer in held["waves", prompt, position] for h in layer)


class MassMerger(HashedInWaves, Merger):
    """Folds each victim's value into the newest token's: the sum of the values a head holds only
    grows by each new token's, if each merge of a step sees the values the previous one left."""
    decode_reads = frozenset({"values"})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sums = []  # (layer, position, [H] sum of the held values, [H] the new token's)

    def decode_scores(self, probs, state, step):
        values = step.values.float().sum(-1)                                 # [1, H, S]
        newest = step.key_positions == step.positions[:, None, None]
        self.sums.append((step.layer, int(step.positions[0]), (values * step.visible).sum(-1)[0],
                          (values * newest).sum(-1)[0]))
        return super().decode_scores(probs, state, step)

    def merge_evicted(self, victim, evicting, state, step):
        values = step.values.float()
        into = (step.key_positions == step.positions[:, None, None])[..., None]   # the newest token
        evicted = values.gather(-2, victim[..., None, None].expand(-1, -1, 1, values.shape[-1]))
        return {"v": values + into * evicted}


def test_a_merger_evicting_several_in_one_step_merges_each_into_what_the_previous_left(tiny):
    method = MassMerger(budget=12)
    serve(tiny, method, TINY_PROMPTS[2:3], 400, 40)
    by_layer = {}
    for layer, position, total, new in method.sums:
        by_layer.setdefault(layer, []).append((position, total, new))
    cuts = 0
    for rows in by_layer.values():
        for (p0, total0, _), (p1, total1, new1) in zip(rows, rows[1:]):
            assert p1 == p0 + 1
            torch.testing.assert_close(total1 - new1, total0, rtol=1e-5, atol=1e-4)
            cuts += p0 % 8 == 0
    assert cuts >= 4
