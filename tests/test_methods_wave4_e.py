"""KV-Compress (whole blocks per head under one budget for all layers) and FastGen (a policy per
head from a prompt profile): on hand-built metrics and attention whose answer is worked out by
hand, against plain restatements, and in the engine under continuous batching with preemption."""

import math

import pytest
import torch

from test_methods_decode_wave2 import TINY_PROMPTS, pointing, serve
from nanokv.methods import make_method
from nanokv.methods.base import DecodeStep, PrefillView, observation_attention
from nanokv.methods.fastgen import PUNCT, SPECIAL, FastGen, is_control, is_punctuation
from nanokv.methods.kv_compress import KVCompress, blocks_to_evict, chunk_metrics, tokens_evicted

inf = float("inf")


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


# --- kv_compress: blocks of the lowest metrics ---------------------------------------------------

def test_a_heads_blocks_start_with_its_hanging_tokens_and_cost_their_highest_metric():
    # one head of 6 tokens, block_size 4: its last block holds 2 (h = 2), so its cheapest block is
    # its 2 lowest metrics (1, 2: cost 2) and the next would reach the protected token (inf).
    metric = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 3.0, inf]]])
    held = torch.tensor([[6]])
    chunks = chunk_metrics(metric, held, 4)
    assert chunks.tolist() == [[[2.0, inf]]]
    # a second head [0.5, 6, 7, 8, 9, inf] costs 6 for its first block: with one block to free,
    # head 0 gives it up (2 < 6) and drops 2 tokens, keeping one whole block
    other = chunk_metrics(torch.tensor([[[0.5, 6.0, 7.0, 8.0, 9.0, inf]]]), held, 4)
    both = torch.cat([chunks, other], dim=1)
    evicted = blocks_to_evict(both, torch.tensor([1]))
    assert evicted.tolist() == [[1, 0]]
    assert tokens_evicted(evicted, torch.tensor([[6, 6]]), 4).tolist() == [[2, 0]]


class FixedMetric(KVCompress):
    """KV-Compress with the metric given per layer (the allocation is what is tested)."""
    metrics: dict = {}

    def metric_of(self, view):
        return self.metrics[view.layer]


def prefill_all(method, S, H=1, num_layers=2, D=4):
    """keep_mask over every layer of one prompt, as the engine calls it -> ({layer: mask}, {layer:
    blocks written})."""
    state, masks, blocks = {}, {}, {}
    for layer in range(num_layers):
        view = PrefillView(layer, num_layers, torch.zeros(S, H, D), torch.zeros(H, S, D), torch.arange(S),
                           sequence_state=state)
        mask = method.keep_mask(view)
        if mask is not None:
            masks[layer] = mask
        masks.update(method.earlier_keep_masks(view))
        blocks.update({at: int(f["kvc_blocks"][0, 0]) for at, f in method.earlier_prefill_state(view).items()})
    return masks, blocks


def test_the_prefill_evicts_the_lowest_blocks_of_all_layers_together():
    # 2 layers x 1 head, 8 tokens, block_size 2, budget 4: the sequence keeps 2 x 4 / 2 = 4 blocks
    # of the 8 it holds. Every block is 2 tokens (8 fill whole blocks); the newest 2 are protected.
    # layer 0 metrics 9 1 2 8 3 7 | . .  sorted 1 2 | 3 7 | 8 9 -> blocks cost 2, 7, 9
    # layer 1 metrics .5 6 5 .1 4 .2 | . .  sorted .1 .2 | .5 4 | 5 6 -> blocks cost .2, 4, 6
    # the 4 lowest: .2, 2, 4, 6 -> layer 1 gives up 3 blocks (keeps its protected 6, 7), layer 0
    # one (its 1 and 2, positions 1 and 2)
    method = FixedMetric(budget=4, block_size=2, protected_window=2)
    method.metrics = {0: torch.tensor([[9.0, 1, 2, 8, 3, 7, 0, 0]]), 1: torch.tensor([[0.5, 6, 5, 0.1, 4, 0.2, 0, 0]])}
    masks, blocks = prefill_all(method, 8)
    assert kept(masks[0]) == [[0, 3, 4, 5, 6, 7]] and kept(masks[1]) == [[6, 7]]
    assert blocks == {0: 3, 1: 1}


def restated_prefill(metrics, budget, bs, protected):
    """A plain loop: list every (layer, head)'s evictable blocks (sorted metrics cut into the
    hanging count, then block_size each; a block costs its highest), take the lowest
    L H ceil(S/bs) - L H B // bs finite ones, and drop each head's lowest tokens they hold."""
    L, H, S = metrics.shape
    hanging = (S - 1) % bs + 1
    candidates = []
    for l in range(L):
        for h in range(H):
            values = [(inf if s >= S - protected else float(metrics[l, h, s])) for s in range(S)]
            ordered = sorted(values)
            for k, end in enumerate(range(hanging - 1, S, bs)):
                if ordered[end] < inf:
                    candidates.append((ordered[end], l * H + h, k, l, h))
    excess = L * H * math.ceil(S / bs) - L * H * budget // bs
    count = [[0] * H for _ in range(L)]
    for _, _, _, l, h in sorted(candidates)[:max(0, excess)]:
        count[l][h] += 1
    masks = []
    for l in range(L):
        rows = []
        for h in range(H):
            drop = 0 if count[l][h] == 0 else (count[l][h] - 1) * bs + hanging
            values = [(inf if s >= S - protected else float(metrics[l, h, s])) for s in range(S)]
            order = sorted(range(S), key=lambda s: (values[s], s))
            rows.append(sorted(set(range(S)) - set(order[:drop])))
        masks.append(rows)
    return masks


def test_the_prefill_allocation_restated():
    torch.manual_seed(3)
    L, H, S = 3, 2, 13
    for budget, bs, protected in ((6, 4, 2), (9, 3, 3), (5, 2, 1)):
        metrics = torch.rand(L, H, S)
        method = FixedMetric(budget=budget, block_size=bs, protected_window=protected)
        method.metrics = dict(enumerate(metrics))
        masks, blocks = prefill_all(method, S, H, L)
        expected = restated_prefill(metrics, budget, bs, protected)
        assert [kept(masks[l]) for l in range(L)] == expected
        assert sum(blocks.values()) <= L * H * budget // bs
        for l in range(L):  # each head keeps whole blocks
            assert all(len(row) % bs == 0 for row in expected[l] if len(row) < S)


def decode_state(metrics, blocks, positions):
    """One sequence, heads holding slots at positions 0..S-1 in order; its query at `positions`."""
    metric = torch.tensor([metrics])
    H, S = metric.shape[1:]
    k_pos = torch.arange(S).expand(1, H, S)
    step = DecodeStep(0, torch.tensor([positions]), torch.tensor([positions]), k_pos, k_pos <= positions,
                      torch.tensor([100]))
    return {"kvc_metric": metric, "kvc_blocks": torch.full((1, H, S), blocks, dtype=torch.int32)}, step


def test_decode_frees_the_layers_excess_blocks_from_the_cheapest_heads():
    # 2 heads of 5 tokens (position 4 is the query's, protected), block_size 2: 3 blocks each, 6,
    # and the layer holds 4. Each head's first evictable block is its one lowest token (its last
    # block holds 1); the next, 2 more tokens.
    method = make_method("kv_compress", budget=16, block_size=2, protected_window=1)
    # head 0 sorted .1 | .3 .5 | .9 (costs .1, .5); head 1 sorted .05 | .2 .7 | .8 (costs .05, .7):
    # the 2 lowest are .05 and .1 -> each head drops its lowest token
    state, step = decode_state([[0.9, 0.1, 0.5, 0.3, 0.0], [0.2, 0.8, 0.7, 0.05, 0.0]], 4, 4)
    assert method.decode_budgets(state, step).tolist() == [[4, 4]]
    # head 1 now costs .6 then .7: head 0's .1 and .5 are cheaper -> head 0 gives up 1 + 2 tokens
    # (keeping one block), head 1 keeps all 5 (3 blocks): 1 + 3 = 4
    state, step = decode_state([[0.9, 0.1, 0.5, 0.3, 0.0], [0.6, 0.8, 0.7, 0.65, 0.0]], 4, 4)
    assert method.decode_budgets(state, step).tolist() == [[2, 5]]
    # the engine's victims: the lowest scores outside the protected window
    scores, new = method.decode_scores(torch.zeros(1, 2, 2, 5), state, step)
    assert torch.equal(scores, state["kvc_metric"]) and (new["kvc_blocks"] == 4).all()
    # compress once: nothing is evicted while generating
    once = make_method("kv_compress", budget=16, block_size=2, protected_window=1, continual=False)
    assert once.decode_budgets(state, step).tolist() == [[5, 5]]


def test_decode_metric_adds_the_groups_squared_attention():
    method = make_method("kv_compress", budget=16, block_size=2, protected_window=1)
    state, step = decode_state([[1.0, 2.0, 0.0]], 9, 2)
    probs = torch.tensor([[[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]]]])               # [1, 1, group 2, 3]
    scores, new = method.decode_scores(probs, state, step)
    assert scores.tolist() == [[[1.25, 3.0625, 0.0625]]]
    l1 = make_method("kv_compress", budget=16, block_size=2, protected_window=1, metric="l1")
    assert l1.decode_scores(probs, state, step)[0].tolist() == [[[1.5, 3.25, 0.25]]]


def test_the_prefill_metric_is_the_windows_squared_attention_pooled_then_summed_over_the_group():
    torch.manual_seed(1)
    keys, queries = torch.randn(2, 10, 8), torch.randn(10, 4, 8)
    view = PrefillView(0, 2, queries, keys, torch.arange(10))
    method = make_method("kv_compress", budget=64, window_size=3, kernel_size=3)
    attention = observation_attention(view, 3)                                   # [4, 3, 10]
    per_query_head = (attention ** 2).sum(dim=1)
    pooled = torch.stack([torch.stack([per_query_head[q, max(0, s - 1):s + 2].max() for s in range(10)])
                          for q in range(4)])
    torch.testing.assert_close(method.metric_of(view), pooled.view(2, 2, 10).sum(dim=1))


def test_kv_compress_holds_its_blocks_through_preemption(tiny):
    # budget 12, block size 4: every layer of a finished sequence holds 2 heads x 12 / 4 = 6 blocks
    # (its share from the prefill's allocation when the prompt was compressed, sum 12), each
    # head in whole blocks of what it holds; long prompts leave heads and layers uneven
    method = make_method("kv_compress", budget=12, block_size=4, protected_window=4, window_size=4)
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    assert preemptions == 0
    tight, tight_held, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0 and tight == roomy
    assert [h[0].tolist() for h in tight_held] == [h[0].tolist() for h in held]
    for lengths, blocks in held:
        assert (blocks == (lengths + 3) // 4).all()
        assert blocks.sum() == 2 * 2 * 12 // 4
    assert any((lengths != 12).any() for lengths, _ in held)  # per-head rates differ somewhere
    assert cache.pool.num_free == cache.pool.usable_blocks


def test_kv_compress_refuses_bad_options():
    with pytest.raises(ValueError, match=r"budget=10 must be at least protected_window \+ block_size = 24"):
        make_method("kv_compress", budget=10)
    with pytest.raises(ValueError, match=r"kernel_size=4 .* must be an odd integer"):
        make_method("kv_compress", budget=64, kernel_size=4)
    with pytest.raises(ValueError, match=r"metric='l3' .* must be 'l2' or 'l1'"):
        make_method("kv_compress", budget=64, metric="l3")
    with pytest.raises(ValueError, match=r"window_size=0 .* must be an integer >= 1"):
        make_method("kv_compress", budget=64, window_size=0)


# --- fastgen: a policy per head -------------------------------------------------------------------

def test_punctuation_and_control_tokens_by_text():
    assert [is_punctuation(t) for t in (".", " ,", ":\n", "?!", "...", "a.", " ", "", "\u3002")] == \
        [True, True, True, True, True, False, False, False, True]
    assert [is_control(t) for t in ("<s>", "</s>", "[INST]", "<|im_start|>", "<|", "<div>")] == \
        [True, True, True, True, False, False]


VOCAB = ["<s>", "a", ".", "b", " ,", "c", "d", "e", "f", "g"]  # 0 special, 2 and 4 punctuation


def profiled(targets, token_ids, **options):
    """A FastGen over one kv-head with one query head whose query i attends (almost) only to key
    targets[i] (or as far back as it sees) -> (method, view)."""
    keys, queries = pointing(targets, len(targets))
    view = PrefillView(0, 1, queries, keys, torch.arange(len(targets)), token_ids=torch.tensor(token_ids))
    view.column_sums = observation_attention(view, len(targets)).sum(dim=1)
    method = make_method("fastgen", **options)
    method.bind_vocabulary(VOCAB)
    return method, view


def test_a_head_on_special_and_punctuation_tokens_keeps_only_those():
    # queries 0, 1, 5 look at <s>, queries 2, 3, 4 at ".": special alone recovers 3/6 < 0.95,
    # special + punctuation all of it -> policy 1: the prompt keeps <s> and "." (0 and 2)
    method, view = profiled([0, 0, 2, 2, 2, 0], [0, 1, 2, 3, 5, 6], compression=0.05)
    assert method.state_of(view)["fg_policy"][0, 0] == 1
    assert kept(method.keep_mask(view)) == [[0, 2]]


def test_a_local_head_takes_the_window_and_a_looser_threshold_stops_at_the_heavy_hitters():
    # each query looks at itself (10 tokens; <s> at 0, "." at 2). r_f = r_l = 0.3: 3 heavy hitters
    # among the plain tokens (the earliest, whose column sums also carry the later queries' crumbs:
    # 1, 3, 4) and a window of 3. Policy 2 recovers queries 0-4: 0.5; policy 3 each query's own
    # token: ~1 -> T = 0.95 takes policy 3 (keeps 0-4 and 7-9), T = 0.4 policy 2 (keeps 0-4)
    ids = [0, 1, 2, 3, 5, 6, 7, 8, 9, 1]
    method, view = profiled(list(range(10)), ids, compression=0.05)
    assert method.state_of(view)["fg_policy"][0, 0] == 3
    assert kept(method.keep_mask(view)) == [[0, 1, 2, 3, 4, 7, 8, 9]]
    method, view = profiled(list(range(10)), ids, compression=0.6)
    assert method.state_of(view)["fg_policy"][0, 0] == 2
    assert kept(method.keep_mask(view)) == [[0, 1, 2, 3, 4]]
    recovered = method.recoveries(view, method.token_kinds(view), method.heavy_hitters(view.column_sums, method.token_kinds(view)))
    torch.testing.assert_close(recovered[:, 0], torch.tensor([0.1, 0.2, 0.5, 1.0]), atol=1e-3, rtol=0)


def restated_profile(method, view):
    """Plain loops: each query head's kept mass per policy, query by query, averaged; the kv-head's
    policy is the first whose group mean reaches 1 - compression."""
    H, S, D = view.keys.shape
    Hq = view.queries.shape[1]
    g = Hq // H
    kinds = [int(method.kinds[t]) | (SPECIAL if s < method.special_tokens else 0) for s, t in enumerate(view.token_ids)]
    k_f, k_l = math.ceil(0.3 * S - 1e-9), math.ceil(0.3 * S - 1e-9)
    policies = []
    for h in range(H):
        plain = [s for s in range(S) if kinds[s] == 0]
        hitters = set(sorted(plain, key=lambda s: -float(view.column_sums[h, s]))[:k_f])
        mass = [0.0] * 4
        for qh in range(h * g, h * g + g):
            for i in range(S):
                logits = [float(view.queries[i, qh] @ view.keys[h, j]) / math.sqrt(D) if j <= i else -inf for j in range(S)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                probs = [w / sum(weights) for w in weights]
                for j in range(S):
                    special, punct = kinds[j] & SPECIAL, kinds[j] & PUNCT
                    sets = [special, special or punct, special or punct or j in hitters,
                            special or punct or j in hitters or j > i - k_l]
                    for p in range(4):
                        mass[p] += probs[j] if sets[p] else 0.0
        recovered = [m / (S * g) for m in mass]
        policies.append(next((p for p in range(4) if recovered[p] >= 1 - method.compression), 4))
    return policies


def test_the_profile_restated():
    torch.manual_seed(0)
    S, H = 12, 2
    for compression in (0.02, 0.2, 0.5, 0.8):
        keys, queries = torch.randn(H, S, 8) * 2, torch.randn(S, 4, 8) * 2
        ids = torch.randint(0, len(VOCAB), (S,))
        view = PrefillView(0, 1, queries, keys, torch.arange(S), token_ids=ids)
        view.column_sums = observation_attention(view, S).sum(dim=1).view(H, 2, S).mean(dim=1)
        method = make_method("fastgen", compression=compression)
        method.bind_vocabulary(VOCAB)
        assert method.state_of(view)["fg_policy"][:, 0].tolist() == restated_profile(method, view)


def test_decode_applies_each_heads_policy_to_what_it_holds():
    # 3 heads holding positions 0-5 (the query at 5, a prompt of 5): <s> at 0, "." at 2.
    # head 0, policy 1: keeps 0 and 2, its 4 plain tokens go (budget 2);
    # head 1, policy 2: keeps 0, 2 and ceil(0.3 x 6) = 2 plain by frequency: 2 go (budget 4),
    #   scores inf on 0 and 2, the frequencies elsewhere (the lowest, 5 and 3, go);
    # head 2, policy 3: also the window ceil(0.3 x 5) = 2 (positions 4, 5): plain 1, 3 -> both stay
    method = make_method("fastgen", compression=0.1)
    S = 6
    k_pos = torch.arange(S).expand(1, 3, S)
    step = DecodeStep(0, torch.tensor([5]), torch.tensor([5]), k_pos, torch.ones(1, 3, S, dtype=torch.bool),
                      torch.tensor([4]))
    freq = torch.tensor([[[0.0, 0.5, 0.0, 0.1, 0.9, 0.05]]]).expand(1, 3, S)
    state = {"fg_freq": freq, "fg_kind": torch.tensor([SPECIAL, 0, PUNCT, 0, 0, 0]).expand(1, 3, S).int(),
             "fg_policy": torch.tensor([1, 2, 3])[None, :, None].expand(1, 3, S).int()}
    scores, new = method.decode_scores(torch.zeros(1, 3, 2, S), state, step)
    assert torch.equal(scores[0, 1], torch.tensor([inf, 0.5, inf, 0.1, 0.9, 0.05]))
    assert torch.equal(scores[0, 2], torch.tensor([inf, 0.5, inf, 0.1, inf, inf]))
    state.update(new)
    assert method.decode_budgets(state, step).tolist() == [[2, 4, 6]]
    # when the step says which token it feeds (DecodeStep.token_ids), a generated
    # "." at position 5 is punctuation: head 0 keeps it too (budget 3), head 1 has one plain
    # token fewer (1, 3, 4: one goes, budget 5)
    method.bind_vocabulary(VOCAB)
    step.token_ids = torch.tensor([2])
    scores, new = method.decode_scores(torch.zeros(1, 3, 2, S), state, step)
    assert new["fg_kind"][0, :, 5].tolist() == [PUNCT] * 3 and scores[0, 0, 5] == inf
    state.update(new)
    assert method.decode_budgets(state, step).tolist() == [[3, 5, 6]]


def test_fastgen_heads_hold_their_policy_through_preemption(tiny):
    """After every decode step each head holds its special tokens (and by policy the punctuation and
    the window) and no more plain tokens than ceil(r_f n) (none below policy 2); a full head holds
    every token; outputs are the same with preemption, and the pool gets every block back."""
    vocab = [("." if i % 7 == 3 else " ," if i % 11 == 5 else f"w{i}") for i in range(256)]
    method = make_method("fastgen", compression=0.3)
    method.bind_vocabulary(vocab)
    seen = set()

    def check(seq, position, cache):
        n = position + 1
        for layer in range(cache.num_layers):
            tables, lengths = cache.held(seq.id, layer)
            fields = cache.read_slots(tables, ("fg_policy", "fg_kind", "pos"))
            for h in range(cache.num_kv_heads):
                length = int(lengths[0, h])
                policy = int(fields["fg_policy"][0, h, 0])
                kinds, pos = fields["fg_kind"][0, h, :length], fields["pos"][0, h, :length]
                # every slot's kind is its token's, generated ones (DecodeStep.token_ids) included;
                # the first position is special whatever it holds
                expected = method.kinds[torch.tensor(seq.all_token_ids)[pos.long()]].masked_fill(pos == 0, SPECIAL)
                assert torch.equal(kinds, expected)
                seen.add(policy)
                if policy == 4:
                    assert sorted(pos.tolist()) == list(range(n))
                    continue
                local = pos > position - math.ceil(0.3 * seq.compress_len - 1e-9)
                plain = (kinds == 0) if policy < 3 else (kinds == 0) & ~local
                if policy < 1:
                    plain |= (kinds & PUNCT) > 0
                assert int(plain.sum()) <= (math.ceil(0.3 * n - 1e-9) if policy >= 2 else 0)

    roomy, _, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, 20, on_decode=check)
    assert preemptions == 0 and len(seen) >= 2  # the heads took different policies
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 44, 20, on_decode=check)
    assert tight_preemptions > 0 and tight == roomy
    assert cache.pool.num_free == cache.pool.usable_blocks


def test_fastgen_refuses_bad_options_and_budgets():
    with pytest.raises(ValueError, match=r"fastgen takes compression=r .* not budget=12"):
        make_method("fastgen", budget=12)
    with pytest.raises(ValueError, match=r"frequent_ratio=1.5 .* must be a number in \[0, 1\]"):
        make_method("fastgen", compression=0.1, frequent_ratio=1.5)
    with pytest.raises(ValueError, match=r"special_tokens=-1 .* must be an integer >= 0"):
        make_method("fastgen", compression=0.1, special_tokens=-1)
    method = make_method("fastgen", compression=0.1)
    view = PrefillView(0, 1, torch.zeros(3, 1, 2), torch.zeros(1, 3, 2), torch.arange(3))
    view.column_sums = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="fastgen needs the prompt's token ids and the vocabulary"):
        method.keep_mask(view)
    assert isinstance(method, FastGen)
