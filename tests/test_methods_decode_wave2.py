"""Decode-time scorers beyond H2O and TOVA: A2SF, Keyformer, Scissorhands and RoCo. Each on
hand-built attention whose victim is known by hand, then in the engine: against a plain
restatement of the method (greedy tokens and the positions every head holds), and under
continuous batching with mixed prompt lengths, preemption and recompute, holding its budget
in real blocks."""

import math

import numpy as np
import pytest
import torch

from helpers import generate_holding, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import DecodeEvictor, DecodeStep, PrefillView, observation_attention, prompt_logits
from nanokv.methods.keyformer import exponential_noise

inf = float("inf")


def view(keys, queries, layer=5):
    H, S, D = keys.shape
    return PrefillView(layer, 30, queries, keys, torch.arange(S))


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def step(positions, budgets, S, prompt_lens=None, visible=None, layer=3):
    """A DecodeStep for b sequences of one kv-head whose slots hold positions 0..S-1 in order."""
    b = len(positions)
    positions, budgets = torch.tensor(positions), torch.tensor(budgets)
    key_positions = torch.arange(S).expand(b, 1, S)
    if visible is None:
        visible = key_positions <= positions[:, None, None]
    prompt_lens = positions if prompt_lens is None else torch.tensor(prompt_lens)
    return DecodeStep(layer, positions, prompt_lens, key_positions, visible, budgets)


def victim(method, scores, st):
    """The engine's choice: the lowest score among the visible slots outside the recent
    window, the oldest among equals (nanokv/engine/attention.py _evict)."""
    recent = method.recent_window(st.budgets)
    eligible = st.visible & (st.key_positions <= (st.positions - recent)[:, None, None])
    scores = scores.masked_fill(~eligible, inf)
    lowest = scores == scores.min(dim=-1, keepdim=True).values
    return st.key_positions.masked_fill(~lowest | ~eligible, 1 << 30).argmin(dim=-1)


def pointing(targets, S, D=None, strength=30.0):
    """One kv-head with one query head whose query i attends (almost) only to key targets[i]:
    key j is strength * e_j, query i is e_targets[i] (scaled by sqrt(D) in attention)."""
    D = D or S
    keys = torch.eye(S, D)[None] * strength
    queries = torch.zeros(len(targets), 1, D)
    for i, t in enumerate(targets):
        queries[i, 0, t] = 1.0
    return keys, queries


# --- the framework: prompt attention in chunks, DecodeStep ------------------------------------

def test_prompt_logits_in_chunks_are_the_attention_rows():
    torch.manual_seed(0)
    keys, queries = torch.randn(2, 11, 8), torch.randn(11, 6, 8)
    v = view(keys, queries)
    whole = observation_attention(v, 11)                                   # [Hq, T, S]
    rows = []
    for start, logits in prompt_logits(v, 3, chunk_bytes=4 * 6 * 11 * 2):  # two rows a chunk
        assert logits.shape[1] <= 2 and start == 3 + 2 * len(rows)
        rows.append(logits.softmax(-1))
    torch.testing.assert_close(torch.cat(rows, dim=1), whole[:, 3:])


# --- A2SF -------------------------------------------------------------------------------------

def test_a2sf_decode_forgets_so_an_old_heavy_hitter_loses_to_a_current_one():
    # slot 0 was attended to heavily long ago (2.0), slot 1 less (1.5) but is attended now
    # (0.4); slot 2 is the query's own token, in the recent window. H2O: 2.0 vs 1.9, slot 1
    # goes. A2SF with λ = 0.5: 1.0 vs 1.15, slot 0 goes.
    probs = torch.tensor([0.0, 0.4, 0.6]).view(1, 1, 1, 3)
    st = step([2], [2], 3)
    h2o, a2sf = make_method("h2o", budget=2, recent_ratio=0.5), make_method("a2sf", budget=2, forgetting=0.5,
                                                                              recent_size=1)
    h2o_scores, _ = h2o.decode_scores(probs, {"h2o_score": torch.tensor([[[2.0, 1.5, 0.0]]])}, st)
    a2sf_scores, state = a2sf.decode_scores(probs, {"a2sf_score": torch.tensor([[[2.0, 1.5, 0.0]]])}, st)
    torch.testing.assert_close(a2sf_scores, torch.tensor([[[1.0, 1.15, 0.6]]]))
    assert torch.equal(state["a2sf_score"], a2sf_scores)
    assert victim(h2o, h2o_scores, st).item() == 1
    assert victim(a2sf, a2sf_scores, st).item() == 0
    # with λ = 1 it is H2O's sum, slot 1 goes
    plain, _ = make_method("a2sf", budget=2, forgetting=1.0, recent_size=1).decode_scores(
        probs, {"a2sf_score": torch.tensor([[[2.0, 1.5, 0.0]]])}, st)
    assert victim(a2sf, plain, st).item() == 1


def test_a2sf_prefill_weighs_each_prompt_query_by_its_age():
    # 8 prompt tokens: queries 0-4 look at token 0, queries 5-7 at token 5. Summed (λ = 1) token 0
    # wins, 5 against 3; with λ = 0.5 token 5 wins: 0.5^2 + 0.5 + 1 against 0.5^7 + ... + 0.5^3
    keys, queries = pointing([0, 0, 0, 0, 0, 5, 5, 5], 8)
    v = view(keys, queries)
    keep_one = dict(budget=1, recent_size=0)
    assert kept(make_method("a2sf", forgetting=1.0, **keep_one).keep_mask(v)) == [[0]]
    assert kept(make_method("a2sf", forgetting=0.5, **keep_one).keep_mask(v)) == [[5]]
    state = make_method("a2sf", forgetting=0.5, **keep_one).prefill_state(v)["a2sf_score"]
    torch.testing.assert_close(state[0, [0, 5]], torch.tensor([sum(0.5 ** k for k in range(3, 8)), 1.75]), atol=1e-3,
                               rtol=0)
    # the same sums from the attention matrix, weighted row by row
    attention = observation_attention(v, 8)[0]                               # [T, S]
    weights = 0.5 ** torch.arange(7, -1, -1.0)
    torch.testing.assert_close(state[0], (weights[:, None] * attention).sum(0))
    # the newest recent_size tokens are kept whatever their score
    assert kept(make_method("a2sf", forgetting=1.0, budget=3, recent_size=2).keep_mask(v)) == [[0, 6, 7]]


# --- Keyformer --------------------------------------------------------------------------------

def test_keyformer_temperature_rises_linearly_then_holds():
    method = make_method("keyformer", budget=8)
    assert [float(method.temperature(s)) for s in (0, 32, 64, 128, 500)] == [1.0, 1.25, 1.5, 2.0, 2.0]
    # in decode the step is the query's position past the prompt: prompt of 10, query at 10 is step 1
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0]).view(1, 1, 1, 4)            # slot 3: padding
    custom = make_method("keyformer", budget=8, noise="none", tau_steps=4)  # tau 1, 1.25, ..., 2 from step 4
    at = {}
    for position in (9, 10, 13, 40):
        st = step([position], [8], 4, prompt_lens=[10], visible=torch.tensor([[[True, True, True, False]]]))
        at[position], _ = custom.decode_scores(probs, {"keyformer_score": torch.zeros(1, 1, 4)}, st)
    torch.testing.assert_close(at[9][0, 0], probs[0, 0, 0])                  # step 0: tau 1
    sharp = torch.tensor([0.5, 0.25, 0.25]) ** (1 / 1.25)
    torch.testing.assert_close(at[10][0, 0, :3], sharp / sharp.sum())       # step 1: tau 1.25
    # tau 2: softmax(log p / 2) = sqrt(p) / sum sqrt(p) = 0.7071, 0.5, 0.5 over 1.7071
    expected = torch.tensor([0.70710678, 0.5, 0.5, 0.0]) / 1.70710678
    torch.testing.assert_close(at[13][0, 0], expected)
    torch.testing.assert_close(at[40][0, 0], expected)


def test_keyformer_without_noise_at_temperature_one_is_accumulated_attention():
    torch.manual_seed(1)
    keys, queries = torch.randn(2, 12, 8), torch.randn(12, 4, 8)
    v = view(keys, queries)
    plain = make_method("keyformer", budget=5, noise="none", tau_end=1.0)
    column_sums = observation_attention(v, 12).sum(1).view(2, 2, 12).mean(1)   # H2O's prefill score
    torch.testing.assert_close(plain.prefill_state(v)["keyformer_score"], column_sums)
    probs = torch.rand(2, 2, 2, 6).softmax(-1)
    state = torch.rand(2, 2, 6)
    st = DecodeStep(3, torch.tensor([20, 30]), torch.tensor([12, 12]), torch.arange(6).expand(2, 2, 6),
                    torch.ones(2, 2, 6, dtype=torch.bool), torch.tensor([5, 5]))
    ours, _ = plain.decode_scores(probs, {"keyformer_score": state}, st)
    h2o, _ = make_method("h2o", budget=5).decode_scores(probs, {"h2o_score": state}, st)
    torch.testing.assert_close(ours, h2o)
    # the noise changes the scores, the same way every time
    noisy = make_method("keyformer", budget=5, tau_end=1.0)
    a, _ = noisy.decode_scores(probs, {"keyformer_score": state}, st)
    b, _ = noisy.decode_scores(probs, {"keyformer_score": state}, st)
    assert torch.equal(a, b) and not torch.allclose(a, ours, atol=1e-3)
    # and so does the choice: among equal attention the noise (its seed) picks the victim
    flat, st1 = torch.full((1, 1, 1, 6), 1 / 6), step([5], [4], 6)
    picks = set()
    for seed in range(8):
        seeded = make_method("keyformer", budget=4, seed=seed)
        scores, _ = seeded.decode_scores(flat, {"keyformer_score": torch.zeros(1, 1, 6)}, st1)
        picks.add(int(victim(seeded, scores, st1)))
    assert len(picks) > 1


def plain_hash32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gumbel(noise):
    """-log E (numpy: torch.log is very slow on small tensors with two threads here)."""
    return torch.from_numpy(-np.log(noise.double().numpy())).float()


def test_keyformer_noise_is_a_seeded_hash_with_a_gumbel_distribution():
    def plain(seed, layer, q_pos, head, k_pos):
        h = plain_hash32(seed)
        for part in (layer, q_pos, head, k_pos):
            h = plain_hash32(h ^ part)
        return -math.log(((h >> 9) + 0.5) / 2 ** 23)

    values = exponential_noise(7, 3, torch.tensor([[100], [101]]), 2, torch.arange(5))   # [2, 5]
    expected = [[plain(7, 3, q, 2, k) for k in range(5)] for q in (100, 101)]
    torch.testing.assert_close(values, torch.tensor(expected))
    assert not torch.equal(exponential_noise(8, 3, 100, 2, torch.arange(5)), values[0])   # another seed
    many = gumbel(exponential_noise(0, 0, torch.arange(300)[:, None], 0, torch.arange(300)[None])).double()
    assert abs(many.mean() - 0.5772) < 0.02 and abs(many.var() - math.pi ** 2 / 6) < 0.05  # Gumbel(0, 1)


def test_keyformer_computes_the_noised_softmax_without_logarithms():
    # softmax((log p + ζ) / τ), ζ = -log E, is (p / E)^(1/τ) normalised
    torch.manual_seed(2)
    probs = torch.rand(2, 3, 2, 7).softmax(-1)
    probs[..., -1] = 0                                                     # a padded slot
    probs /= probs.sum(-1, keepdim=True)
    tau = torch.tensor([1.0, 1.7]).view(2, 1, 1, 1)
    q_pos, heads, k_pos = torch.tensor([40, 50]).view(2, 1, 1, 1), torch.arange(6).view(1, 3, 2, 1), torch.arange(7)
    noise = exponential_noise(0, 4, q_pos, heads, k_pos)
    with np.errstate(divide="ignore"):                                     # log 0 = -inf at the padding
        log_probs = torch.from_numpy(np.log(probs.double().numpy()))
    expected = ((log_probs + gumbel(noise)) / tau).softmax(-1).float()
    got = make_method("keyformer", budget=4).noised(probs, tau, 4, q_pos, heads, k_pos)
    torch.testing.assert_close(got, expected)
    assert (got[..., -1] == 0).all()


# --- Scissorhands -----------------------------------------------------------------------------

def test_scissorhands_counts_queries_below_uniform_over_its_history_window():
    method = make_method("scissorhands", budget=3, history_window=2, recent_size=1)
    # four visible slots (uniform level 1/4, not 1/5: the fifth is padding); slot 0 was below
    # uniform for both queries in the window (history 0b11, count 2), slot 1 for the older one
    # only (0b10, 1). Now slot 0 gets exactly 1/4 (not below), slot 3 0.22 (below 1/4, not 1/5)
    probs = torch.tensor([0.25, 0.10, 0.43, 0.22, 0.0]).view(1, 1, 1, 5)
    visible = torch.tensor([[[True, True, True, True, False]]])
    st = step([3], [3], 5, visible=visible)
    state = {"scissorhands_history": torch.tensor([[[0b11, 0b10, 0b00, 0b00, 0]]]),
             "scissorhands_count": torch.tensor([[[2, 1, 0, 0, 0]]], dtype=torch.int32)}
    scores, new = method.decode_scores(probs, state, st)
    # now: slots 1 and 3 below 1/4. Slot 0: the oldest low leaves, now high -> 0b10, count 1;
    # slot 1: 0b10 leaves, low now -> 0b01, 1; slot 2 high -> 0; slot 3 low -> 0b01, 1
    assert new["scissorhands_history"][0, 0, :4].tolist() == [0b10, 0b01, 0b00, 0b01]
    assert new["scissorhands_count"][0, 0, :4].tolist() == [1, 1, 0, 1]
    assert scores[0, 0, :4].tolist() == [-1.0, -1.0, 0.0, -1.0]
    assert victim(method, scores, st).item() == 0      # slots 0 and 1 tie at 1 (3 is recent): the oldest
    # a window of 3 still holds the older lows: nothing leaves
    longer = make_method("scissorhands", budget=3, history_window=3, recent_size=1)
    scores, new = longer.decode_scores(probs, state, st)
    assert new["scissorhands_count"][0, 0, :4].tolist() == [2, 2, 0, 1]
    assert new["scissorhands_history"][0, 0, :4].tolist() == [0b110, 0b101, 0b000, 0b001]


def test_scissorhands_prefill_keeps_the_tokens_seldom_below_uniform_lately():
    # 8 tokens; queries 4..7 (the history window) point at 1, 1, 5, 5: a token is above uniform
    # only when pointed at, and counted only by the queries that see it. Query 7 is the newest
    # (bit 0), query 4 the oldest (bit 3).
    keys, queries = pointing([0, 0, 0, 0, 1, 1, 5, 5], 8)
    v = view(keys, queries)
    method = make_method("scissorhands", budget=3, history_window=4, recent_size=1)
    state = method.prefill_state(v)
    # tokens 0, 2, 3, 4: below uniform for all four; 1: for queries 6, 7 (bits 1, 0); 5: for
    # query 5 only (query 4 does not see it, 6 and 7 point at it); 6: queries 6, 7; 7: query 7
    assert state["scissorhands_count"][0].tolist() == [4, 2, 4, 4, 4, 1, 2, 1]
    assert state["scissorhands_history"][0, [1, 5, 6, 7]].tolist() == [0b0011, 0b0100, 0b0011, 0b0001]
    # budget 3: token 7 (recent), then the fewest counts: 5 (1), then 6 over 1 (2 each: the newer)
    assert kept(method.keep_mask(v)) == [[5, 6, 7]]
    # budget 5: also 1 (2), then of 0, 2, 3, 4 (4 each) the newest, 4
    assert kept(make_method("scissorhands", budget=5, history_window=4, recent_size=1).keep_mask(v)) \
        == [[1, 4, 5, 6, 7]]


# --- RoCo -------------------------------------------------------------------------------------

def test_roco_spares_the_volatile_token_and_evicts_the_lowest_steady_mean():
    # each slot was seen by one query before (its attention x in roco_sum, x^2 in roco_squares)
    # and gets attention a now: mean (x + a) / 2, std |x - a| / 2
    x = torch.tensor([0.0, 0.2, 0.5, 0.35, 0.0])
    a = torch.tensor([0.3, 0.2, 0.5, 0.25, 0.1])
    state = {"roco_sum": x.view(1, 1, 5), "roco_squares": (x ** 2).view(1, 1, 5),
             "roco_count": torch.tensor([[[1.0, 1, 1, 1, 0]]])}
    st = step([4], [4], 5)
    # budget 4, 1 recent: int(0.3 * 4) + 1 = 2 outside the scope: slot 4 (recent) and the highest
    # std, slot 0 (mean 0.15, std 0.15). The scope is 1 (0.2), 2 (0.5), 3 (0.3): slot 1 goes.
    roco = make_method("roco", budget=4, recent_size=1)
    scores, new = roco.decode_scores(a.view(1, 1, 1, 5), state, st)
    assert new["roco_count"][0, 0].tolist() == [2, 2, 2, 2, 1]
    torch.testing.assert_close(scores[0, 0, 1:4], torch.tensor([0.2, 0.5, 0.3]))
    assert scores[0, 0, 0] == inf
    assert victim(roco, scores, st).item() == 1
    # no robustness scope (int(0.1 * 4) + 1 = 1: the recent slot only): the lowest mean, slot 0
    plain = make_method("roco", budget=4, recent_size=1, robust_ratio=0.1)
    assert victim(plain, plain.decode_scores(a.view(1, 1, 1, 5), state, st)[0], st).item() == 0


def test_roco_protects_the_highest_std_whatever_the_slot_order_ties_to_the_newer():
    from nanokv.methods.roco import protect_highest

    std = torch.tensor([[0.1, 0.1, 0.1, 0.0, 0.5]])
    positions = torch.tensor([[3, 1, 2, 0, 4]])                  # slots out of position order
    candidates = torch.tensor([[True, True, True, True, False]])  # slot 4 (highest) is not a candidate
    assert protect_highest(std, positions, candidates, torch.tensor([2])).tolist() == [[True, False, True, False,
                                                                                         False]]
    assert protect_highest(std, positions, candidates, torch.tensor([0])).sum() == 0


def test_roco_prefill_means_divide_by_the_queries_that_see_each_token():
    # all logits 0: query i spreads 1 / (i + 1) over tokens 0..i. Token j is seen by 4 - j of the
    # 4 queries; its mean is the sum over those divided by 4 - j, not by 4
    v = view(torch.zeros(1, 4, 2), torch.zeros(4, 2, 2))
    state = make_method("roco", budget=2).prefill_state(v)
    assert state["roco_count"][0].tolist() == [4, 3, 2, 1]
    means = [(1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, (1 / 2 + 1 / 3 + 1 / 4) / 3, (1 / 3 + 1 / 4) / 2, 1 / 4]
    torch.testing.assert_close(state["roco_sum"][0] / state["roco_count"][0], torch.tensor(means))
    # a window of the last 2 queries: every token is seen by both but the last
    window = make_method("roco", budget=2, window_size=2).prefill_state(v)
    assert window["roco_count"][0].tolist() == [2, 2, 2, 1]
    torch.testing.assert_close(window["roco_sum"][0], torch.tensor([7 / 12, 7 / 12, 7 / 12, 1 / 4]))


def test_roco_prefill_keeps_recent_then_volatile_then_highest_means():
    # 9 tokens; queries point at: 0 for the first five, then 2, 4, 4, 4. Token 0: high mean,
    # high std over its queries; token 4: steady from query 6 on (after a low start)
    # 9 tokens; queries point at 0 for the first five, then 2, 4, 4, 4 (attention ~1 or ~0).
    # Token 0: seen by 9 queries, 1 from five: mean 5/9, std 0.497; token 4: seen by queries
    # 4..8, 1 from three: mean 3/5, std 0.490; token 2: 1 from one of seven: 1/7, std 0.350;
    # the others almost nothing
    keys, queries = pointing([0, 0, 0, 0, 0, 2, 4, 4, 4], 9)
    v = view(keys, queries)
    state = make_method("roco", budget=3, recent_size=1).prefill_state(v)
    mean = (state["roco_sum"] / state["roco_count"])[0]
    std = (state["roco_squares"] / state["roco_count"] - mean ** 2).clamp(min=0).sqrt()[0]
    torch.testing.assert_close(mean[[0, 4, 2]], torch.tensor([5 / 9, 3 / 5, 1 / 7]), atol=1e-3, rtol=0)
    torch.testing.assert_close(std[[0, 4, 2]], torch.tensor([0.4969, 0.4899, 0.3499]), atol=1e-3, rtol=0)
    # no sinks: budget 3, 1 recent (token 8), int(0.3) + 1 - 1 = 0 by std: then the two highest means, 4 and 0
    assert kept(make_method("roco", budget=3, recent_size=1, sink_size=0).keep_mask(v)) == [[0, 4, 8]]
    # budget 5, prefill_robust_ratio 0.5: int(2.5) + 1 - 1 = 2 kept by std (0 and 4), then the
    # two highest means of the rest: 2, and the best of the nearly-zero ones
    got = kept(make_method("roco", budget=5, recent_size=1, sink_size=0, prefill_robust_ratio=0.5).keep_mask(v))[0]
    fifth = max((j for j in (1, 3, 5, 6, 7)), key=lambda j: mean[j])
    assert got == sorted([0, 2, 4, 8, fifth])
    # the decode share (robust_ratio) plays no part at prefill: int(0.5) + 1 - 1 = 0 by std, so the
    # four highest means: 4, 0, 2 and that best nearly-zero one
    got = kept(make_method("roco", budget=5, recent_size=1, sink_size=0, robust_ratio=0.5).keep_mask(v))[0]
    assert got == sorted([0, 2, 4, 8, fifth])


def test_roco_prefill_protects_sinks_and_a_tenth_of_the_budget_as_easykv_encoding():
    # EasyKV's prefill (encoding mode): the first temp_length = 4 tokens and the newest out of the
    # scope, which is budget - int(0.1 budget) - 4 lowest std. 12 tokens; queries point at 0 for
    # the first four, then 4, 5, 5, 6, 6, 7, 6, 5: means 5: 3/7, 6: 1/2, 7: 1/5, 4: 1/8, 1-3 ~0.
    # Budget 8, 1 recent: sinks 0-3 and 11, int(0.8) + 1 - 1 = 0 by std, then the three highest
    # means of 4..10: 6, 5, 7
    keys, queries = pointing([0, 0, 0, 0, 4, 5, 5, 6, 6, 7, 6, 5], 12)
    v = view(keys, queries)
    method = make_method("roco", budget=8, recent_size=1)
    assert (method.sink_size, method.prefill_robust_ratio, method.robust_ratio) == (4, 0.1, 0.3)
    assert kept(method.keep_mask(v)) == [[0, 1, 2, 3, 5, 6, 7, 11]]
    # no sinks and the decode share 0.3 (int(2.4) + 1 - 1 = 2 by std: 6 and 5), then the highest
    # means: 0, 7, 4 and two nearly-zero ones
    old = kept(make_method("roco", budget=8, recent_size=1, sink_size=0, prefill_robust_ratio=0.3).keep_mask(v))[0]
    assert {0, 4, 5, 6, 7, 11} < set(old) and len(old) == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="a2sf", forgetting=0.0), r"forgetting=0.0 .* must be a number in \(0, 1\]"),
    (dict(name="a2sf", forgetting="x"), "forgetting='x' .* must be float"),
    (dict(name="keyformer", noise="gauss"), "noise='gauss' .* 'gumbel' or 'none'"),
    (dict(name="keyformer", tau_steps=0), "tau_steps=0 .* integer >= 1"),
    (dict(name="scissorhands", history_window=63), r"history_window=63 .* integer in \[1, 62\]"),
    (dict(name="roco", robust_ratio=1.0), r"robust_ratio=1.0 .* in \[0, 1\)"),
    (dict(name="roco", prefill_robust_ratio=-0.1), r"prefill_robust_ratio=-0.1 .* in \[0, 1\)"),
    (dict(name="roco", sink_size=-1), r"sink_size=-1 .* integer >= 0"),
    (dict(name="roco", windw=3), "unknown option 'windw' for method 'roco'; valid: window_size, recent_size"),
    (dict(name="scissorhands+kivi"), "scissorhands evicts during decode"),
])
def test_bad_settings_name_the_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(**kwargs)


def test_generate_lists_them_and_names_valid_values_on_a_bad_option():
    from test_cli import assert_one_line_error, run

    listed = run("--list-methods").stdout
    for name, paper in (("a2sf", "2407.20485"), ("keyformer", "2403.09054"), ("scissorhands", "2305.17118"),
                        ("roco", "2402.06262")):
        assert any(line.startswith(name) and paper in line for line in listed.splitlines()), name
    assert_one_line_error(run("--method", "keyformer", "--budget", "64", "--method-arg", "noise=gauss", "hi"),
                          "noise='gauss'", "'gumbel' or 'none'")
    assert_one_line_error(run("--method", "roco", "--budget", "64", "--method-arg", "r=3", "hi"),
                          "unknown option 'r'", "window_size, recent_size, robust_ratio")


# --- in the engine ----------------------------------------------------------------------------

class PlainEviction:
    """A2SF, Keyformer, Scissorhands or RoCo stated plainly for one sequence, as the model's
    attention: per (layer, kv-head) a list of entries in arrival order, each a dict with the
    token's position, k, v and its statistics; eviction by list removal. Independent of nanokv's
    cache, kernels and methods, except Keyformer's noise function (the definition of its random
    numbers). Keyformer scores from the logits, not from log-probabilities."""

    def __init__(self, kind, budget, options):
        self.kind, self.budget, self.o = kind, budget, options
        self.heads, self.positions, self.prompt_len = {}, None, None
        self.recent = {"a2sf": min(options.get("recent_size", 16), budget),
                       "keyformer": int(budget * options.get("recent_ratio", 0.3)),
                       "scissorhands": min(options.get("recent_size", 10), budget),
                       "roco": min(options.get("recent_size", 10), budget)}[kind]

    def __call__(self, layer, q, k, v, sliding_window):
        T, Hq, D = q.shape
        H = k.shape[1]
        group = Hq // H
        heads = self.heads.setdefault(layer, [[] for _ in range(H)])
        for h in range(H):
            heads[h] += [dict(pos=int(p), k=k[t, h], v=v[t, h]) for t, p in enumerate(self.positions)]
        out, logits = torch.empty_like(q), []
        for h in range(H):
            keys = torch.stack([e["k"] for e in heads[h]])
            values = torch.stack([e["v"] for e in heads[h]])
            key_pos = torch.tensor([e["pos"] for e in heads[h]])
            z = q[:, h * group:(h + 1) * group].transpose(0, 1) @ keys.T / math.sqrt(D)  # [group, T, S]
            z[:, key_pos[None, :] > self.positions[:, None]] = float("-inf")
            out[:, h * group:(h + 1) * group] = (z.softmax(-1) @ values).transpose(0, 1)
            logits.append(z)
        if T > 1:
            self.prompt_len = T
            self.prefill(layer, heads, logits)
        else:
            self.decode(layer, heads, logits)
        return out

    def gumbel_probs(self, layer, h, z, tau):
        """softmax((z + noise) / tau) per query head of kv-head h, averaged: [T, S]."""
        group, T, S = z.shape
        if self.o.get("noise", "gumbel") == "gumbel":
            q_head = (h * group + torch.arange(group))[:, None, None]
            key_pos = torch.tensor([e["pos"] for e in self.heads[layer][h]])
            z = z + gumbel(exponential_noise(self.o.get("seed", 0), layer, self.positions[None, :, None], q_head,
                                             key_pos))
        return (z / tau).softmax(-1).mean(0)

    def tau(self, step):
        t = min(step, self.o.get("tau_steps", 128)) / self.o.get("tau_steps", 128)
        return 1.0 + t

    def prefill(self, layer, heads, logits):
        n, w = self.prompt_len, self.o.get("history_window", 32)
        for h, entries in enumerate(heads):
            p = logits[h].softmax(-1).mean(0)                                   # [T, S] over the group
            if self.kind == "keyformer":
                noised = self.gumbel_probs(layer, h, logits[h], self.tau(0))
            rows = p.tolist()
            for j, e in enumerate(entries):
                if self.kind == "a2sf":
                    lam = self.o.get("forgetting", 0.95)
                    e["score"] = sum(lam ** (n - 1 - i) * rows[i][j] for i in range(j, n))
                elif self.kind == "keyformer":
                    e["score"] = float(noised[:, j].sum())
                elif self.kind == "scissorhands":  # flags of the last w queries, newest first
                    e["low"] = [i >= j and rows[i][j] < 1 / (i + 1) for i in range(n - 1, max(n - w, 0) - 1, -1)]
                else:                                                           # the queries that see token j
                    e["seen"] = [rows[i][j] for i in range(j, n)]
            keep = self.prefill_keep(entries)
            heads[h][:] = [entries[i] for i in sorted(keep)]

    def stats(self, e):
        """RoCo's mean and (population) standard deviation of the attention the token received."""
        mean = sum(e["seen"]) / len(e["seen"])
        return mean, math.sqrt(sum((x - mean) ** 2 for x in e["seen"]) / len(e["seen"]))

    def prefill_keep(self, entries):
        n, B = len(entries), self.budget
        if n <= B:
            return list(range(n))
        keep = list(range(n - self.recent, n))
        older = range(n - self.recent)
        if self.kind == "scissorhands":
            ranked = sorted(older, key=lambda i: (sum(entries[i]["low"]), -i))
        elif self.kind == "roco":  # the sinks kept too, and the prefill share of the budget
            sinks = [i for i in older if entries[i]["pos"] < self.o.get("sink_size", 4)]
            keep += sinks
            older = [i for i in older if i not in sinks]
            protect = max(0, int(B * self.o.get("prefill_robust_ratio", 0.1)) + 1 - self.recent)
            volatile = sorted(older, key=lambda i: (-self.stats(entries[i])[1], -i))[:protect]
            keep += volatile
            ranked = sorted((i for i in older if i not in volatile), key=lambda i: -self.stats(entries[i])[0])
        else:
            ranked = sorted(older, key=lambda i: -entries[i]["score"])
        return keep + ranked[:B - len(keep)]

    def decode(self, layer, heads, logits):
        now = int(self.positions[-1])
        w = self.o.get("history_window", 32)
        for h, entries in enumerate(heads):
            p = logits[h].softmax(-1).mean(0)[0].tolist()                       # this query's attention
            if self.kind == "keyformer":
                g = self.gumbel_probs(layer, h, logits[h], self.tau(now - self.prompt_len + 1))[0].tolist()
            for e, a, i in zip(entries, p, range(len(entries))):
                if self.kind == "a2sf":
                    e["score"] = self.o.get("forgetting", 0.95) * e.get("score", 0.0) + a
                elif self.kind == "keyformer":
                    e["score"] = e.get("score", 0.0) + g[i]
                elif self.kind == "scissorhands":
                    e["low"] = ([a < 1 / len(entries)] + e.get("low", []))[:w]
                else:
                    e["seen"] = e.get("seen", []) + [a]
            if len(entries) <= self.budget:
                continue
            candidates = [e for e in entries if e["pos"] <= now - self.recent]
            if self.kind == "scissorhands":
                entries.remove(min(candidates, key=lambda e: (-sum(e["low"]), e["pos"])))
            elif self.kind == "roco":
                protect = max(0, int(self.budget * self.o.get("robust_ratio", 0.3)) + 1 - self.recent)
                volatile = sorted(candidates, key=lambda e: (-self.stats(e)[1], -e["pos"]))[:protect]
                scope = [e for e in candidates if not any(e is x for x in volatile)]
                entries.remove(min(scope, key=lambda e: (self.stats(e)[0], e["pos"])))
            else:
                entries.remove(min(candidates, key=lambda e: (e["score"], e["pos"])))


PROMPT = [100 + (j * 13) % 5000 for j in range(48)]
ENGINE_CASES = {  # options that exercise each method within a short run
    "a2sf": dict(forgetting=0.9, recent_size=8),
    "keyformer": dict(tau_steps=6, seed=3),
    "scissorhands": dict(history_window=16),
    "roco": dict(robust_ratio=0.5),
}


@pytest.mark.parametrize("kind", list(ENGINE_CASES))
@pytest.mark.slow
def test_decode_time_eviction_matches_a_plain_statement_of_the_method(smollm2_gguf, kind):
    """Greedy tokens and the positions every (layer, head) holds at the end, through the engine
    (paged cache, slot fields, swap-into-victim eviction) and through PlainEviction."""
    from nanokv import LLM

    budget, steps, options = 24, 10, ENGINE_CASES[kind]
    llm = LLM(str(smollm2_gguf), dtype="float32", method=kind, budget=budget, **options)
    tokens_out, held = generate_holding(llm, PROMPT, steps)

    reference = PlainEviction(kind, budget, options)
    tokens = restated_greedy(llm.model, reference, PROMPT, steps)
    expected = [sorted(e["pos"] for e in entries) for layer in sorted(reference.heads)
                for entries in reference.heads[layer]]
    assert tokens_out == tokens
    assert all(len(h) == budget for h in held)
    agree = sum(len(set(a) & set(b)) for a, b in zip(held, expected))
    assert agree == budget * len(held), f"{agree} of {budget * len(held)} held positions agree"


def serve(tiny, method, prompts, blocks, steps, block_size=4, kernels="reference", max_length=256, on_decode=None):
    """Every prompt through the scheduler and runner (continuous batching, preemption) over a pool
    of `blocks` blocks -> (outputs, {seq: (lengths [L, H], blocks [L, H]) when it finished},
    preemptions, the cache). on_decode(seq, position, cache): after each decode step, per sequence,
    the position of the token it fed."""
    from nanokv.kernels import kernels_for
    from nanokv.cache import PagedKVCache
    from nanokv.cache.pool import BlockPool
    from nanokv.engine.runner import ModelRunner
    from nanokv.engine.scheduler import Scheduler
    from nanokv.engine.sequence import Sequence
    from nanokv.sampling import SamplingParams

    model, cfg = tiny
    per_block = BlockPool.block_bytes(block_size, cfg.head_dim, torch.float32, method.slot_fields)
    cache = PagedKVCache.from_memory(cfg, blocks * per_block, block_size, torch.float32,
                                     extra_fields=method.slot_fields)
    cache.kernels = kernels_for("cpu", kernels, cache.workspace)
    scheduler, runner = Scheduler(cache, 8, 64, method), ModelRunner(model, cache, "cpu", method)
    seqs = [Sequence(p, SamplingParams(max_tokens=steps, ignore_eos=True), set(), lambda t: "", max_length)
            for p in prompts]
    held, finish = {}, scheduler.finish

    def capture(seq):
        held[seq.id] = (cache.seqs[seq.id].lengths.clone(), cache.seqs[seq.id].num_blocks.clone())
        finish(seq)

    scheduler.finish = capture
    scheduler.add(seqs)
    while not scheduler.finished:
        batch, is_prefill = scheduler.schedule()
        for seq, token in zip(batch, runner.step(batch, is_prefill) if batch else []):
            if on_decode is not None and not is_prefill:
                on_decode(seq, len(seq) - 1, cache)
            seq.append(token)
            if seq.finished:
                scheduler.finish(seq)
    return [s.output_token_ids for s in seqs], [held[s.id] for s in seqs], sum(s.num_preemptions for s in seqs), cache


TINY_PROMPTS = [[(i * 37 + j * 11) % 256 for j in range(n)] for i, n in enumerate((6, 3, 20, 2, 15, 9, 4, 7))]


class SeenCount(DecodeEvictor):
    """Evicts the token the fewest queries have seen, and its state ignores step.visible on
    purpose: which slots a step may change is the cache's business."""
    name = "seen_count"
    slot_fields = {"seen": torch.float32}

    def scores(self, view):
        return view.positions.float().expand(view.keys.shape[0], -1)

    def decode_scores(self, probs, state, step):
        seen = state["seen"] + 1
        return seen + probs.mean(dim=2), {"seen": seen}


def test_a_replay_changes_no_slot_field_of_a_token_before_it_existed(tiny):
    """A recompute holds all its generated tokens while it replays their evictions: the cache
    keeps a step's new slot fields only where the query sees the slot, so a method that counts
    every slot still replays what it did."""
    method = SeenCount(budget=12)
    roomy, _, _, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    tight, _, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert preemptions > 0 and tight == roomy


@pytest.mark.parametrize("kind", list(ENGINE_CASES))
def test_mixed_prompts_hold_the_budget_in_real_blocks_through_preemption(tiny, kind):
    """Continuous batching of prompts shorter and longer than the budget: every (layer, head)
    ends holding the budget, in the budget's blocks, and the pool gets every block back; with
    too few blocks sequences are preempted and recomputed (their generated tokens replay their
    evictions) and every output is as with room to spare."""
    budget, steps, options = 12, 20, dict(ENGINE_CASES[kind])
    if kind == "roco":
        options["recent_size"] = 3  # so that std protects some of a budget of 12: int(6) + 1 - 3
    if kind == "a2sf":
        options["recent_size"] = 4
    method = make_method(kind, budget=budget, **options)
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, steps)
    assert preemptions == 0
    # 44 blocks: the 20-token prompt and its 20 tokens alone need 4 heads x 10 (the scheduler's
    # check ignores the budget); 8 sequences at the budget need up to 8 x 16. Sequences are
    # preempted after generating up to 10 tokens, which their recompute replays
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, steps)
    assert tight_preemptions > 0
    assert tight == roomy
    for lengths, blocks in held:  # every prompt + 20 tokens is past the budget
        assert (lengths == budget).all() and (blocks == budget // 4).all()
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.parametrize("kind", list(ENGINE_CASES))
def test_the_triton_kernels_give_the_same_tokens(tiny, kind):
    """What a GPU runs: the Triton decode kernel's probabilities (under TRITON_INTERPRET on CPU)
    drive the same evictions as the plain-torch kernels'."""
    method = make_method(kind, budget=12, **ENGINE_CASES[kind])
    prompts = TINY_PROMPTS[:4]
    assert serve(tiny, method, prompts, 400, 8, kernels="triton")[0] == serve(tiny, method, prompts, 400, 8)[0]
