"""Wave 4, group b: SCOPE (a prompt compressed once, a decode budget of its own for generated
tokens), ALISA (Sparse Window Attention: recent tokens plus the tokens the last queries attended
to most) and HashEvict (SimHash codes of keys, the key farthest from the query evicted). Each on
hand-built inputs whose answer is worked out by hand, against a plain restatement, then in the
engine under continuous batching, preemption and recompute."""

import pytest
import torch

from helpers import held_positions
from nanokv.methods import make_method
from nanokv.methods.base import DecodeStep, PrefillView, observation_attention
from nanokv.methods.hashevict import hamming, hyperplanes, popcount, simhash
from test_methods_decode_wave2 import TINY_PROMPTS, kept, serve
from test_methods_decode_wave3 import victim

inf = float("inf")


def step(position, budget, S, prompt_len=None, H=1, **reads):
    """A DecodeStep for one sequence of H kv-heads whose slots hold positions 0..S-1 in order."""
    positions = torch.tensor([position])
    key_positions = torch.arange(S).expand(1, H, S)
    prompt_lens = torch.tensor([position if prompt_len is None else prompt_len])
    return DecodeStep(3, positions, prompt_lens, key_positions, key_positions <= position, torch.tensor([budget]),
                      **reads)


# --- SCOPE ------------------------------------------------------------------------------------

def test_scope_decode_never_picks_a_prompt_token_and_evicts_the_least_attended_generated_one():
    # a 4-token prompt (kept whole: budget 4), then generated positions 4..8; the query at 8.
    # The prompt gets no attention at all, yet it is never eligible. Of the generated tokens the
    # newest 2 (7, 8) are the recent window; among 4, 5, 6 (0.3, 0.1, 0.2) slot 5 goes. The
    # decode budget is 4 prompt + 4 generated = 8, and 9 are held: one is evicted.
    method = make_method("scope", budget=4, window_size=2, decoding_window_size=4, decoding_recent_size=2)
    assert method.decode_budget(4) == 8 and method.decode_budget(50) == 8  # min(prompt, 4) + 4
    st = step(8, method.decode_budget(4), 9, prompt_len=4)
    probs = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, 0.1, 0.2, 0.25, 0.15]).view(1, 1, 1, 9)
    scores, state = method.decode_scores(probs, {}, st)
    assert state == {} and torch.isinf(scores[0, 0, :4]).all()
    torch.testing.assert_close(scores[0, 0, 4:], probs[0, 0, 0, 4:])   # this query's attention, not a sum
    assert victim(method, scores, st) == 5
    assert method.decode_budgets({}, st).tolist() == [[8]]
    # GQA: the two query heads of the kv-head are averaged
    two = torch.tensor([[0.0] * 4 + [0.5, 0.0, 0.1, 0.2, 0.2], [0.0] * 4 + [0.0, 0.4, 0.1, 0.3, 0.2]]).view(1, 1, 2, 9)
    scores, _ = method.decode_scores(two, {}, st)
    assert victim(method, scores, st) == 6                              # 0.25, 0.2, 0.1


def test_scope_adaptive_and_discontinuous_budgets_move_with_the_decode_step():
    # prompt 10 cut to 4, recent 2, delta 3; t = position - 10. adaptive: 4 + 2 + t // 3.
    # discontinuous adds t % 4: a cut back to the adaptive budget every delta + 1 = 4 steps
    options = dict(budget=4, window_size=2, decoding_window_size=9, decoding_recent_size=2, delta=3)
    adaptive = make_method("scope", decoding_metric="adaptive", **options)
    discontinuous = make_method("scope", decoding_metric="discontinuous", **options)
    slide = make_method("scope", **options)
    assert adaptive.budgets_from_state and discontinuous.budgets_from_state and not slide.budgets_from_state
    assert adaptive.decode_budget(10) == 6 and slide.decode_budget(10) == 13
    for t, grown, cut in ((0, 6, 6), (1, 6, 7), (3, 7, 10), (4, 7, 7), (5, 7, 8), (9, 9, 10)):
        st = step(10 + t, adaptive.decode_budget(10), 12, prompt_len=10)
        assert adaptive.decode_budgets({}, st).item() == grown, t
        assert discontinuous.decode_budgets({}, st).item() == cut, t
        st = step(10 + t, slide.decode_budget(10), 12, prompt_len=10)
        assert slide.decode_budgets({}, st).item() == 13


def test_scope_prefill_is_snapkv_with_its_options():
    torch.manual_seed(0)
    keys, queries = torch.randn(2, 30, 8), torch.randn(30, 4, 8)
    view = PrefillView(1, 4, queries, keys, torch.arange(30))
    options = dict(window_size=4, kernel_size=5, pooling="avg")
    scope, snapkv = make_method("scope", budget=12, **options), make_method("snapkv", budget=12, **options)
    assert torch.equal(scope.keep_mask(view), snapkv.keep_mask(view))
    assert all(set(range(26, 30)) <= set(row) for row in kept(scope.keep_mask(view)))  # the window stays
    assert make_method("scope", budget=40, **options).keep_mask(view) is None          # a short prompt stays whole


def scope_schedule(kind, prompt_len, budget, steps, window, recent, delta):
    """A plain statement of what each head holds after each decode step: min(prompt, budget)
    prompt tokens, and the generated ones up to the step's decode budget."""
    prompt, generated, held = min(prompt_len, budget), 0, []
    for t in range(steps):
        limit = window if kind == "slide" else recent + t // delta + (t % (delta + 1) if kind == "discontinuous" else 0)
        generated = min(generated + 1, limit)
        held.append(prompt + generated)
    return held


@pytest.mark.parametrize("kind", ["slide", "adaptive", "discontinuous"])
def test_scope_in_the_engine_keeps_its_prompt_tokens_and_holds_the_decode_budget(tiny, kind):
    """Mixed prompt lengths under continuous batching: after every decode step each (layer,
    head) still holds exactly the prompt positions prefill kept, plus the generated tokens the
    strategy's budget allows (a plain loop); with too few blocks sequences are preempted and
    recomputed to the same outputs, and the pool gets every block back."""
    options = dict(budget=8, window_size=2, kernel_size=3, decoding_window_size=6, decoding_recent_size=2, delta=3,
                   decoding_metric=kind)
    method, steps = make_method("scope", **options), 20
    seen = {}

    def record(seq, position, cache):
        prompt = [[[p for p in h if p < len(seq.prompt_token_ids)] for h in layer]
                  for layer in held_positions(cache, seq.id)]
        seen.setdefault(tuple(seq.prompt_token_ids), []).append((prompt, cache.seqs[seq.id].lengths.clone()))

    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, steps, on_decode=record)
    assert preemptions == 0
    for prompt in TINY_PROMPTS:
        records = seen[tuple(prompt)]
        expected = scope_schedule(kind, len(prompt), 8, steps - 1, 6, 2, 3)  # the first token comes from prefill
        assert [int(lengths.unique()) for _, lengths in records] == expected, len(prompt)
        first = records[0][0]
        assert all(len(h) == min(len(prompt), 8) for layer in first for h in layer)
        assert all(kept_now == first for kept_now, _ in records), len(prompt)   # prefill's choice, untouched
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, steps)
    assert tight_preemptions > 0 and tight == roomy
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- HashEvict --------------------------------------------------------------------------------

def test_hashevict_codes_are_seeded_gaussian_hyperplanes_and_count_bits():
    planes = hyperplanes(0, 3, 256, 32, "cpu")
    assert torch.equal(planes, hyperplanes(0, 3, 256, 32, "cpu"))           # the same draw every time
    assert not torch.equal(planes, hyperplanes(0, 4, 256, 32, "cpu"))       # another per layer
    assert not torch.equal(planes, hyperplanes(1, 3, 256, 32, "cpu"))       # and per seed
    assert abs(planes.mean()) < 0.05 and abs(planes.std() - 1) < 0.05       # 8192 standard normal draws
    ints = torch.randint(0, 1 << 32, (200,), dtype=torch.int64)
    assert popcount(ints).tolist() == [bin(v).count("1") for v in ints.tolist()]


def test_hashevict_evicts_the_key_pointing_away_from_the_query_and_spares_sinks_and_recent():
    # 6 slots, query at position 5 along +x. Keys alternate +x / -x: a -x key's projections all
    # flip sign, Hamming distance 16 (every bit), a +x key's distance is 0. Slot 0 (-x) is a
    # global token, 4 (-x) and 5 are the 2 recent ones: of slots 1 (+x), 2 (-x), 3 (+x) slot 2 goes.
    method = make_method("hashevict", budget=5, global_tokens=1, recent_tokens=2)
    x = torch.tensor([1.0, 0.5, -0.25, 2.0])
    keys = torch.stack([-x, x, -x, x, -x, 0.7 * x]).view(1, 1, 6, 4)
    st = step(5, 5, 6, keys=keys, queries=x.view(1, 1, 4))
    planes = hyperplanes(0, 3, 4, 16, "cpu")
    stored = simhash(keys[..., :5, :], planes)
    stored = torch.cat([stored, torch.zeros(1, 1, 1, dtype=torch.int64)], dim=-1)  # the new slot starts at 0
    scores, state = method.decode_scores(torch.zeros(1, 1, 1, 6), {"hashevict_code": stored}, st)
    assert state["hashevict_code"][0, 0, 5] == simhash(x, planes)           # the new key hashed into its slot
    assert scores[0, 0, 0] == inf
    assert scores[0, 0, 1:].tolist() == [0.0, -16.0, 0.0, -16.0, 0.0]
    assert victim(method, scores, st) == 2


def test_hashevict_scores_restated_bit_by_bit():
    """Each code bit is the sign of one dot product; a distance counts differing bits; a kv-head's
    score is minus the mean over its query heads."""
    torch.manual_seed(3)
    H, group, S, D, bits = 2, 2, 9, 8, 12
    method = make_method("hashevict", budget=6, hash_bits=bits, global_tokens=1, recent_tokens=1, seed=7)
    keys, queries = torch.randn(1, H, S, D), torch.randn(1, H * group, D)
    planes = hyperplanes(7, 3, D, bits, "cpu")

    def code(vector):
        return sum(1 << j for j in range(bits) if float(vector @ planes[:, j]) >= 0)

    st = step(S - 1, 6, S, H=H, keys=keys, queries=queries)
    scores, state = method.decode_scores(torch.zeros(1, H, group, S), {"hashevict_code": torch.zeros(1, H, S).long()},
                                         st)
    for h in range(H):
        assert state["hashevict_code"][0, h, S - 1] == code(keys[0, h, S - 1])
        for s in range(1, S):
            qs = [code(queries[0, h * group + g]) for g in range(group)]
            k = code(keys[0, h, s]) if s == S - 1 else 0                     # only the new slot is hashed here
            expected = -sum(bin(q ^ k).count("1") for q in qs) / group
            assert scores[0, h, s].item() == expected, (h, s)
    # prefill: every prompt key hashed, ranked by the last prompt query's code
    view = PrefillView(3, 4, queries[0][None].expand(5, -1, -1), keys[0], torch.arange(S))
    codes = method.prefill_state(view)["hashevict_code"]
    assert codes.tolist() == [[code(keys[0, h, s]) for s in range(S)] for h in range(H)]
    distance = hamming(simhash(queries[0], planes), codes)
    for h in range(H):
        ranked = sorted(range(1, S - 1), key=lambda s: (float(distance[h, s]), s))[:4]  # the 4 nearest, oldest first
        assert kept(method.keep_mask(view))[h] == sorted([0, *ranked, S - 1])


def test_hashevict_in_the_engine_holds_the_budget_and_its_sinks_through_preemption(tiny):
    method = make_method("hashevict", budget=12, global_tokens=2, recent_tokens=3)
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    assert preemptions == 0
    sinks = {}

    def record(seq, position, cache):
        sinks.setdefault(seq.id, []).append(all({0, 1} <= set(h) for layer in held_positions(cache, seq.id)
                                                for h in layer))

    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20, on_decode=record)
    assert tight_preemptions > 0 and tight == roomy
    assert all(all(flags) for flags in sinks.values())
    for lengths, blocks in held:                         # every prompt + 20 tokens is past the budget
        assert (lengths == 12).all() and (blocks == 3).all()
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- ALISA ------------------------------------------------------------------------------------

def test_alisa_sums_the_last_queries_attention_so_an_old_heavy_hitter_fades():
    # query_window 2: the ring holds the attention of the queries at positions 4 (field 0) and 3
    # (field 1); the query at 5 overwrites field 1. Slot 0 got 0.9 from query 3, which drops out:
    # sums over queries 4 and 5 are 0.1, 0.6, 0.5, 0.5 for slots 0-3; slots 4, 5 are the local
    # window (budget 4 x 0.5). Slot 0 goes; H2O's running sum (1.0 for slot 0) would keep it.
    # Slot 5's field 0 is stale (0.7: left by a token evicted before; query 4 never saw position
    # 5), so it counts for nothing: slot 5 scores query 5's 0.1 alone.
    method = make_method("alisa", budget=4, query_window=2)
    ring = {"alisa_attention0": torch.tensor([0.1, 0.3, 0.2, 0.4, 0.0, 0.7]).view(1, 1, 6),
            "alisa_attention1": torch.tensor([0.9, 0.0, 0.0, 0.1, 0.0, 0.0]).view(1, 1, 6)}
    probs = torch.tensor([0.0, 0.3, 0.3, 0.1, 0.2, 0.1]).view(1, 1, 1, 6)
    st = step(5, 4, 6)
    scores, state = method.decode_scores(probs, ring, st)
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.1, 0.6, 0.5, 0.5, 0.2, 0.1]))
    assert torch.equal(state["alisa_attention1"], probs[:, :, 0]) and torch.equal(state["alisa_attention0"],
                                                                                  ring["alisa_attention0"])
    assert method.recent_window(st.budgets).tolist() == [2]
    assert victim(method, scores, st) == 0


def test_alisa_prefill_and_decode_restated_as_a_sliding_sum_of_attention_rows():
    """A token's score is the sum of the softmax rows of the last query_window queries (each
    averaged over the kv-head's group), at prefill and after each decode step."""
    torch.manual_seed(5)
    H, group, T, D, w = 2, 2, 10, 8, 3
    keys, queries = torch.randn(H, T, D), torch.randn(T, H * group, D)
    method = make_method("alisa", budget=6, query_window=w)
    view = PrefillView(1, 4, queries, keys, torch.arange(T))
    rows = observation_attention(view, T).view(H, group, T, T).mean(dim=1)   # [H, query, key]
    state = method.prefill_state(view)
    torch.testing.assert_close(sum(state.values()), rows[:, T - w:].sum(dim=1))
    # newest 3 (6 x 0.5) kept, then the 3 highest sums
    sums = rows[:, T - w:].sum(dim=1)
    assert kept(method.keep_mask(view)) == [sorted([*sums[h, :T - 3].topk(3).indices.tolist(), 7, 8, 9])
                                            for h in range(H)]
    # decode steps at positions 10..13 over the 10 prompt slots (plus new ones): random rows
    S, fields, history = 14, {k: v.view(1, H, T) for k, v in state.items()}, list(rows.unbind(dim=1))
    fields = {k: torch.cat([v, torch.zeros(1, H, S - T)], dim=-1) for k, v in fields.items()}
    history = [torch.cat([r, torch.zeros(H, S - T)], dim=-1) for r in history]
    for position in range(T, S):
        probs = torch.rand(1, H, group, S).masked_fill(torch.arange(S) > position, 0)
        scores, fields = method.decode_scores(probs, fields, step(position, 6, S, H=H))
        history.append(probs[0].mean(dim=1))
        torch.testing.assert_close(scores[0], sum(history[-w:]))


def test_alisa_in_the_engine_holds_the_budget_and_the_local_window_through_preemption(tiny):
    method = make_method("alisa", budget=12, query_window=4)
    local = {}

    def record(seq, position, cache):
        newest = set(range(max(0, position - 5), position + 1))
        local.setdefault(seq.id, []).append(all(newest <= set(h) for layer in held_positions(cache, seq.id) for h in layer))

    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20, on_decode=record)
    assert preemptions == 0 and all(all(flags) for flags in local.values())   # the newest 6 always held
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0 and tight == roomy
    for lengths, blocks in held:
        assert (lengths == 12).all() and (blocks == 3).all()
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, message", [
    ("scope", dict(decoding_metric="h2o"), r"decoding_metric='h2o'.*'slide', 'adaptive' or 'discontinuous'"),
    ("scope", dict(decoding_window_size=0), r"decoding_window_size=0.*integer >= 1"),
    ("scope", dict(delta=0), r"delta=0.*integer >= 1"),
    ("scope", dict(decoding_window_size=256), r"decoding_recent_size=256 must be below decoding_window_size=256"),
    ("scope", dict(budget=8), r"budget=8 must exceed window_size=8"),
    ("scope", dict(pooling="mean"), r"pooling='mean'.*'max' or 'avg'"),
    ("alisa", dict(local_ratio=1.0), r"local_ratio=1.0.*\[0, 1\)"),
    ("alisa", dict(query_window=0), r"query_window=0.*\[1, 256\]"),
    ("hashevict", dict(hash_bits=33), r"hash_bits=33.*\[1, 32\]"),
    ("hashevict", dict(recent_tokens=-1), r"recent_tokens=-1.*integer >= 0"),
    ("hashevict", dict(budget=14), r"budget=14 must exceed global_tokens \+ recent_tokens = 14"),
])
def test_bad_settings_name_the_value_and_the_valid_range(name, kwargs, message):
    kwargs = {"budget": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_method(name, **kwargs)
