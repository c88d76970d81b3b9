"""KeepKV (issue 27's last method): ZIP merging on hand-built keys whose merged slot is worked out by
hand, then on random ones (the current query's output before the eviction equals the output after
the merge, and the votes add); the score's moving average per vote; the prefill's merge; and the
engine under continuous batching with mixed prompt lengths and preemption, through every kernel."""

import math

import pytest
import torch

from test_methods_decode_wave2 import TINY_PROMPTS, serve
from nanokv.methods import make_method
from nanokv.methods.base import DecodeStep, PrefillView
from nanokv.methods.keepkv import zip_merge


def output(q, keys, values, log_votes, held):
    """One head's attention with each slot's log votes added: q [g, D] (unscaled), keys and
    values [S, D], log_votes [S], held [S] bool -> [g, D]."""
    logits = q @ keys.T / math.sqrt(q.shape[-1]) + log_votes
    return logits.masked_fill(~held, float("-inf")).softmax(-1) @ values


def test_zip_merge_by_hand():
    # D = 2, one query head q = (sqrt 2, 0): scaled, q' = (1, 0), so a key's logit is its first
    # coordinate. Slot 0 keeps k_t = (0, 1) (logit 0, weight e^0 = 1); slot 1, k_e = (log 3, 1)
    # (logit log 3, weight 3), merges into it. Shares 1/4 and 3/4: v = (v_t + 3 v_e) / 4, the mean
    # key (3/4 log 3, 1); the merged slot (2 votes) needs logit log(1 + 3) - log 2 = log 2, so the
    # key moves along q' to (log 2, 1). Its weight: 2 e^(log 2) = 4 = 1 + 3, as before.
    q = torch.tensor([[[1.0, 0.0]]])                 # [N=1, g=1, D]: zip_merge takes q' = q / sqrt(D)
    keys = torch.tensor([[[0.0, 1.0], [math.log(3), 1.0]]])
    values = torch.tensor([[[4.0, 0.0], [0.0, 8.0]]])
    merged = zip_merge(q, keys, values, torch.zeros(1, 2), torch.tensor([[0.5, 0.1]]), torch.tensor([[0, 0]]))
    torch.testing.assert_close(merged["k"][0, 0], torch.tensor([math.log(2), 1.0]))
    torch.testing.assert_close(merged["v"][0, 0], torch.tensor([1.0, 6.0]))
    torch.testing.assert_close(merged["keepkv_log_votes"][0], torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(merged["keepkv_score"][0], torch.tensor([0.3, 0.1]))  # (0.5 + 0.1) / 2 votes
    # equal logits (k_t = (1, 1), k_e = (1, 1.2) with 3 votes already): shares 1/4 and 3/4, mean key
    # (1, 1.15), needed logit log(e + 3e) - log 4 = 1 = its own: the key stays the mean
    merged = zip_merge(q, torch.tensor([[[1.0, 1.0], [1.0, 1.2]]]), values, torch.tensor([[0.0, math.log(3)]]),
                       torch.zeros(1, 2), torch.tensor([[0, 0]]))
    torch.testing.assert_close(merged["k"][0, 0], torch.tensor([1.0, 1.15]))
    torch.testing.assert_close(merged["v"][0, 0], torch.tensor([1.0, 6.0]))
    assert merged["keepkv_log_votes"][0, 0].exp().item() == pytest.approx(4.0)
    # a slot nothing merges into, or one that merges nowhere (-1), is left as it was
    alone = zip_merge(q, keys, values, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0, -1]]))
    assert torch.equal(alone["k"], keys) and torch.equal(alone["v"], values)


def decode_step(keys, values, queries, positions, q_pos, budget=8):
    """A DecodeStep for b sequences: keys, values [b, H, S, D], queries [b, Hq, D], positions [b, H, S]."""
    visible = positions <= torch.tensor(q_pos)[:, None, None]
    q_pos = torch.tensor(q_pos)
    return DecodeStep(0, q_pos, q_pos, positions, visible, torch.full_like(q_pos, budget), keys, values, queries)


@pytest.mark.parametrize("group", [1, 2])
def test_merge_evicted_keeps_the_current_output_and_adds_the_votes(group):
    # 2 sequences x 2 kv-heads of 7 slots (sequence 1 sees only 6 of them), some merged before
    # (votes 3 and 2); the victim's key is a copy of slot 4's, bent a little, so slot 4 is its
    # target. With one query head per kv-head the output is unchanged to float32 rounding; a group
    # of 2 shares one slot (mean weights): close, not equal.
    gen = torch.Generator().manual_seed(4)
    b, H, S, D = 2, 2, 7, 8
    keys, values = torch.randn(b, H, S, D, generator=gen), torch.randn(b, H, S, D, generator=gen)
    victim = torch.tensor([[1, 2], [0, 5]])
    for i in range(b):
        for h in range(H):
            keys[i, h, victim[i, h]] = keys[i, h, 4] + 0.1 * torch.randn(D, generator=gen)
    queries = torch.randn(b, H * group, D, generator=gen)
    positions = torch.arange(S).expand(b, H, S).clone()
    positions[1, :, 6] = 99  # a later token (a recompute's): not visible
    log_votes = torch.zeros(b, H, S)
    log_votes[0, 0, 4], log_votes[1, 1, 3] = math.log(3), math.log(2)
    state = {"keepkv_score": torch.rand(b, H, S, generator=gen), "keepkv_log_votes": log_votes}
    step = decode_step(keys, values, queries, positions, [6, 5])
    method = make_method("keepkv", budget=16)
    new = method.merge_evicted(victim, torch.ones(b, H, dtype=torch.bool), state, step)
    for i in range(b):
        for h in range(H):
            q = queries[i, h * group:(h + 1) * group]
            held = step.visible[i, h]
            before = output(q, keys[i, h], values[i, h], log_votes[i, h], held)
            after_held = held.clone()
            after_held[victim[i, h]] = False
            after = output(q, new["k"][i, h], new["v"][i, h], new["keepkv_log_votes"][i, h], after_held)
            if group == 1:
                torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
            else:
                assert (after - before).abs().max() < 0.1
            votes = new["keepkv_log_votes"][i, h].exp()
            expected = log_votes[i, h].exp()
            expected[4] += expected[victim[i, h]]
            expected[victim[i, h]] = votes[victim[i, h]]  # (the victim's slot is reused: anything)
            torch.testing.assert_close(votes, expected)
            changed = (new["k"][i, h] != keys[i, h]).any(-1)
            assert changed.nonzero().flatten().tolist() == [4]


def test_a_victim_unlike_every_kept_key_is_dropped_and_nothing_changes():
    # keys along the axes: every cosine similarity is 0 < 0.8
    keys = torch.eye(4)[None, None] * 3
    step = decode_step(keys, torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4), torch.arange(4).view(1, 1, 4), [3])
    state = {"keepkv_score": torch.zeros(1, 1, 4), "keepkv_log_votes": torch.zeros(1, 1, 4)}
    new = make_method("keepkv", budget=16).merge_evicted(torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool),
                                                        state, step)
    assert torch.equal(new["k"], keys) and torch.equal(new["keepkv_log_votes"], state["keepkv_log_votes"])
    # with a threshold of -1 it merges into the oldest of the equally unlike ones: slot 0
    new = make_method("keepkv", budget=16, similarity_threshold=-1.0).merge_evicted(
        torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool), state, step)
    assert new["keepkv_log_votes"][0, 0].exp().tolist() == pytest.approx([2, 1, 1, 1])


def test_the_score_is_a_moving_average_of_attention_per_vote():
    # budget 8, recent_ratio 0.5: a window of 4, decay 1 - 1/4. Slot 1 holds 2 votes. The group's
    # mean attention (0.2, 0.4, 0.4) is (0.2, 0.2, 0.4) per vote; scores 0.75 (0.4, 0.2, 0) +
    # 0.25 (0.2, 0.2, 0.4) = (0.35, 0.2, 0.1); slot 0 is a sink (sink_tokens=1): +inf to evict.
    method = make_method("keepkv", budget=8, sink_tokens=1)
    probs = torch.tensor([[[[0.3, 0.3, 0.4], [0.1, 0.5, 0.4]]]])                    # [1, 1, g=2, 3]
    state = {"keepkv_score": torch.tensor([[[0.4, 0.2, 0.0]]]),
             "keepkv_log_votes": torch.tensor([[[0.0, math.log(2), 0.0]]])}
    step = decode_step(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.zeros(1, 2, 2),
                       torch.arange(3).view(1, 1, 3), [2])
    scores, new = method.decode_scores(probs, state, step)
    torch.testing.assert_close(new["keepkv_score"], torch.tensor([[[0.35, 0.2, 0.1]]]))
    assert scores[0, 0, 0] == float("inf") and scores[0, 0, 1:].tolist() == pytest.approx([0.2, 0.1])
    assert method.recent_window(torch.tensor([8])).tolist() == [4]


def test_the_prefill_merges_what_it_drops_and_keeps_the_last_querys_output():
    # one kv-head, one query head, 24 tokens, budget 12: sinks 0-3 and the newest 6 stay, and the
    # score's top 2 between; every dropped token lands in its most similar kept key (threshold
    # -1: all of them), and the last prompt query reads the same output from the 12 slots as from 24
    gen = torch.Generator().manual_seed(1)
    S, D = 24, 16
    keys, values, queries = torch.randn(1, S, D, generator=gen), torch.randn(1, S, D, generator=gen), \
        torch.randn(S, 1, D, generator=gen)
    view = PrefillView(0, 2, queries, keys, torch.arange(S), values=values)
    method = make_method("keepkv", budget=12, similarity_threshold=-1.0)
    keep = method.keep_mask(view)
    assert keep.sum() == 12 and keep[0, :4].all() and keep[0, -6:].all()
    state = method.state_of(view)
    merged = method.merge(view, keep)
    kept = keep[0]
    before = output(queries[-1], keys[0], values[0], torch.zeros(S), torch.ones(S, dtype=torch.bool))
    after = output(queries[-1], merged["k"][0, kept], merged["v"][0, kept], merged["keepkv_log_votes"][0, kept],
                   torch.ones(12, dtype=torch.bool))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert merged["keepkv_log_votes"][0, kept].exp().sum().item() == pytest.approx(S)
    # restated: each dropped token's target is the kept key of highest cosine similarity
    unit = torch.nn.functional.normalize(keys[0], dim=-1)
    votes = torch.ones(S)
    for e in (~kept).nonzero().flatten().tolist():
        similarity = [float(unit[e] @ unit[t]) if kept[t] else -2.0 for t in range(S)]
        votes[max(range(S), key=similarity.__getitem__)] += 1
    torch.testing.assert_close(merged["keepkv_log_votes"][0, kept].exp(), votes[kept])
    # the scores: the EMA over the last 6 queries (decay 5/6), each merged slot's the vote-weighted mean
    attention = (queries[-6:, 0] @ keys[0].T / math.sqrt(D)).masked_fill(
        torch.arange(S)[None] > torch.arange(S - 6, S)[:, None], float("-inf")).softmax(-1)
    weights = torch.tensor([(1 / 6) * (5 / 6) ** (5 - i) for i in range(6)])
    torch.testing.assert_close(state["keepkv_score"][0], weights @ attention)
    assert torch.equal(state["keepkv_log_votes"], torch.zeros(1, S))


def test_keepkv_holds_its_budget_in_real_blocks_through_preemption(tiny):
    """Mixed prompt lengths (2 to 20 tokens) under continuous batching: every (layer, head) ends at
    the budget in its blocks, merges happened (some slot stands for several tokens), the pool gets
    every block back, and a tight pool's preemptions and recomputes give the same tokens."""
    method = make_method("keepkv", budget=12, similarity_threshold=0.5)
    votes = []
    most_votes = lambda seq, pos, c: votes.append(float(c.pool.fields["keepkv_log_votes"].max()))  # noqa: E731
    roomy, held, preemptions, cache = serve(tiny, method, TINY_PROMPTS, 400, 20, on_decode=most_votes)
    assert preemptions == 0 and max(votes) > math.log(2) - 1e-6
    for lengths, blocks in held:
        assert (lengths == 12).all() and (blocks == 3).all()
    tight, _, tight_preemptions, tight_cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0 and tight == roomy
    for pool in (cache.pool, tight_cache.pool):
        assert pool.num_free == pool.usable_blocks


@pytest.mark.parametrize("kernels", ["cpu", "triton"])
def test_keepkv_gives_the_reference_tokens_through_the_cpp_and_triton_decodes(tiny, kernels):
    method = make_method("keepkv", budget=12, similarity_threshold=0.5)
    prompts = TINY_PROMPTS[:4]
    assert serve(tiny, method, prompts, 400, 10, kernels=kernels)[0] == serve(tiny, method, prompts, 400, 10)[0]


def test_keepkv_refuses_bad_options():
    with pytest.raises(ValueError, match=r"budget=8 must leave room for a token past sink_tokens=4"):
        make_method("keepkv", budget=8)
    with pytest.raises(ValueError, match=r"similarity_threshold=1.5 .* must be a number in \[-1, 1\]"):
        make_method("keepkv", budget=64, similarity_threshold=1.5)
    with pytest.raises(ValueError, match=r"recent_ratio=1.0 .* must be a number in \(0, 1\)"):
        make_method("keepkv", budget=64, recent_ratio=1.0)
    with pytest.raises(ValueError, match=r"sink_tokens=-1 .* must be an integer >= 0"):
        make_method("keepkv", budget=64, sink_tokens=-1)
    with pytest.raises(ValueError, match=r"unknown option 'window'"):
        make_method("keepkv", budget=64, window=4)
