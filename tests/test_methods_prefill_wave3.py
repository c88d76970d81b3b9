"""SepLLM and CAKE: keep-sets and budgets on hand-built inputs where the answer is known, and each
one in the engine under continuous batching."""

import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from nanokv.methods.cake import share_budgets
from nanokv.methods.sepllm import is_separator


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


# --- sepllm -----------------------------------------------------------------------------------

VOCAB = ["a", "b", ".", " ,", "\n", "hello", "!?", " ", "x.", ".\n"]  # separators: 2, 3, 4, 7


def sepllm_mask(token_ids, **options):
    method = make_method("sepllm", **options)
    method.bind_vocabulary(VOCAB)
    S = len(token_ids)
    v = PrefillView(3, 30, torch.zeros(S, 2, 4), torch.zeros(2, S, 4), torch.arange(S),
                    token_ids=torch.tensor(token_ids))
    return method.keep_mask(v)


def test_separators_are_the_official_sepcache_list_by_text():
    assert [i for i, t in enumerate(VOCAB) if is_separator(t)] == [2, 3, 4, 7]
    # SepCache's llama ids: . , ? ! ; : \n alone or after one space, and the all-space tokens
    official = [".", ",", "?", "!", ";", ":", "\n", " .", " ,", " ?", " !", " ;", " :", " \n", " ", "  ", "    "]
    assert all(is_separator(t) for t in official)
    # not in the list: merged punctuation, blank lines, tabs, two spaces before a mark
    others = ["\n\n", ".\n", ".\n\n", "...", ":\n", ",\n", "!?", "\t", "\t.", "  .", ". ", "", "a", " a"]
    assert not any(is_separator(t) for t in others)


def test_sepllm_keeps_sinks_the_latest_separators_and_the_window():
    # budget 14, sink_tokens 2, share 0.25: a=2, s=floor(12 x 0.25)=3, w=9 (tokens 21-29)
    ids = [0] * 30
    for position, token in ((1, 2), (3, 3), (8, 4), (12, 7), (15, 3), (19, 2), (25, 3)):
        ids[position] = token        # 1 is a sink and 25 in the window anyway; 8 and 3 are older than 12, 15, 19
    ids[17], ids[18] = 8, 9          # "x." and ".\n" are not separators
    assert kept(sepllm_mask(ids, budget=14, sink_tokens=2, separator_share=0.25)) == \
        [[0, 1, 12, 15, 19] + list(range(21, 30))] * 2
    # one separator before the window: the two unused places go to the tokens just before it
    few = [0] * 30
    few[10] = 4
    assert kept(sepllm_mask(few, budget=14, sink_tokens=2, separator_share=0.25)) == \
        [[0, 1, 10] + list(range(19, 30))] * 2
    # the paper's cache c=324 splits as a=4, s=64, w=256
    assert make_method("sepllm", budget=324).split(324) == (4, 64, 256)


def test_sepllm_needs_the_token_ids():
    method = make_method("sepllm", budget=8)
    with pytest.raises(ValueError, match="token ids"):
        method.keep_mask(PrefillView(0, 30, torch.zeros(20, 1, 4), torch.zeros(1, 20, 4), torch.arange(20)))


# --- cake -------------------------------------------------------------------------------------

def cake_reference(keys, queries, window, gamma, tau1, tau2, kernel):
    """Float64, one query head at a time, as the official code states it: (preference, token
    scores [H, prefix])."""
    keys, queries = keys.double(), queries.double()
    H, S, D = keys.shape
    Hq = queries.shape[1]
    P = S - window
    entropy, shift, token = 0.0, 0.0, torch.zeros(H, P, dtype=torch.float64)
    for hq in range(Hq):
        h = hq // (Hq // H)
        rows = []
        for i in range(S - window, S):                     # query i sees keys 0..i, softmax over them all
            logits = keys[h, :i + 1] @ queries[i, hq] / math.sqrt(D)
            rows.append(torch.softmax(logits, 0)[:P])      # the older tokens' columns, not renormalised
        A = torch.stack(rows)                              # [W, P]
        entropy += float(-(A * (A + 1e-10).log()).sum())   # one entropy over every head
        mean = A.mean(0)
        var = ((A - mean) ** 2).sum(0) / (window - 1)      # unbiased, as torch.var
        shift += float(var.sum())                          # one variance sum over every head
        token[h] += (mean + gamma * var) / (Hq // H)
    preference = entropy ** (1 / tau1) * shift ** (1 / tau2)
    half = kernel // 2
    padded = torch.cat([torch.zeros(H, half, dtype=torch.float64), token, torch.zeros(H, half, dtype=torch.float64)], 1)
    pooled = torch.stack([padded[:, j:j + kernel].sum(1) / kernel for j in range(P)], dim=1)  # padding counts
    return preference, pooled


@pytest.mark.parametrize("tau1, tau2", [(1.0, 1.0), (1.6, 0.4)])
def test_cake_preference_and_scores_match_a_float64_formula(tau1, tau2):
    torch.manual_seed(0)
    S, W = 24, 6
    keys, queries = torch.randn(2, S, 8), torch.randn(S, 4, 8)
    method = make_method("cake", budget=12, window_size=W, tau1=tau1, tau2=tau2, gamma=200.0)
    preference, scores = method.preference_and_scores(PrefillView(0, 30, queries, keys, torch.arange(S)))
    want_preference, want_scores = cake_reference(keys, queries, W, 200.0, tau1, tau2, 5)
    assert preference == pytest.approx(want_preference, rel=1e-4)
    assert torch.allclose(scores[:, :S - W].double(), want_scores, rtol=1e-4, atol=1e-6)
    assert (scores[:, S - W:] > scores[:, :S - W].max()).all()      # the window is kept first


def test_cake_preference_is_the_product_of_sums_not_the_mean_of_products():
    # head 0 spreads its attention (high entropy, no shift), head 1 moves it (low entropy, high
    # shift): per head H x V is small for both, but the layer's H x V is not
    S, W = 12, 4
    keys = torch.zeros(2, S, 4)
    keys[1, :S - W, 0] = torch.arange(S - W, dtype=torch.float32) * 8
    queries = torch.zeros(S, 2, 4)
    queries[S - W:, 1, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    method = make_method("cake", budget=8, window_size=W)
    preference = method.preference_and_scores(PrefillView(0, 30, queries, keys, torch.arange(S)))[0]
    want, _ = cake_reference(keys, queries, W, 200.0, 1.0, 1.0, 5)
    per_head = [cake_reference(keys[h:h + 1], queries[:, h:h + 1], W, 200.0, 1.0, 1.0, 5)[0] for h in range(2)]
    assert preference == pytest.approx(want, rel=1e-4)
    assert want > 2 * sum(per_head)


def test_cake_a_spread_layer_gets_more_than_a_focused_one():
    # the last queries of layer "spread" attend evenly and differently; "focused" all look at token 0
    S, W = 40, 8
    keys = torch.zeros(1, S, 4)
    keys[0, 0, 0] = 40.0
    queries = torch.zeros(S, 1, 4)
    focused = make_method("cake", budget=16, window_size=W).preference_and_scores(
        PrefillView(0, 30, queries.clone().index_fill_(2, torch.tensor([0]), 1.0), keys, torch.arange(S)))[0]
    torch.manual_seed(1)
    spread = make_method("cake", budget=16, window_size=W).preference_and_scores(
        PrefillView(0, 30, torch.randn(S, 1, 4), torch.randn(1, S, 4), torch.arange(S)))[0]
    assert spread > 100 * focused


def cake_cascade(preferences, scores, budget, window):
    """Run the cascade over len(preferences) layers with given preferences and scores [H, S];
    -> per layer, the prompt tokens it holds after each layer (original indices)."""
    L = len(preferences)
    method = make_method("cake", budget=budget, window_size=window)
    method.preference_and_scores = lambda view: (preferences[view.layer], scores[view.layer])
    H, S = scores[0].shape
    held = [None] * L                                   # original indices each layer holds
    state, history = {}, []
    for layer in range(L):
        v = PrefillView(layer, L, torch.zeros(S, H, 4), torch.zeros(H, S, 4), torch.arange(S), sequence_state=state)
        mask = method.keep_mask(v)
        held[layer] = torch.arange(S).expand(H, S) if mask is None else torch.stack([r.nonzero()[:, 0] for r in mask])
        for earlier, keep in method.earlier_keep_masks(v).items():
            assert keep.shape == held[earlier].shape
            held[earlier] = torch.stack([h[k] for h, k in zip(held[earlier], keep)])
        history.append([None if h is None else h.shape[1] for h in held])
    return held, history


def test_cake_cascade_shares_the_total_by_preference_and_only_shrinks_earlier_layers():
    torch.manual_seed(0)
    L, H, S, B, W = 4, 2, 100, 20, 4                    # total prefix budget 4 x 16 = 64
    preferences = [1.0, 3.0, 2.0, 2.0]
    scores = [torch.cat([torch.rand(H, S - W), torch.full((H, W), 1e6)], 1) for _ in range(L)]
    held, history = cake_cascade(preferences, scores, B, W)
    # after layer l the seen layers share all 64 by preference; by hand: after layer 2 the floors
    # 10.67, 32, 21.33 -> 10, 32, 21 sum to 63, and the one left over goes to the first layer
    assert history == [[68, None, None, None], [20, 52, None, None], [15, 36, 25, None], [12, 28, 20, 20]]
    assert all(sum(c for c in counts if c) <= L * B for counts in history)  # never above the request's total
    # the final keep-sets: each layer's top of its own scores at its final budget, window included
    for layer, h in enumerate(held):
        for head in range(H):
            want = scores[layer][head].topk(history[-1][layer]).indices.sort().values
            assert h[head].tolist() == want.tolist()
    assert make_method("cake", budget=B, window_size=W).kept_after_prefill(S, 0, L) == math.ceil(B * L / (L - 1))


def test_cake_hands_what_a_capped_layer_cannot_hold_to_the_others():
    # S = 30, W = 4: a layer holds at most 26 older tokens; 3 layers share 3 x (20 - 4) = 48
    # preferences 1 : 1 : 6 -> 6, 6, 36; the third is capped at 26 and its 10 go 5 and 5 to the others
    assert share_budgets([1.0, 1.0, 6.0], 48, 26) == [11, 11, 26]
    # floors 10.67 x 3 -> 10 each: the 2 left over go to the first two layers
    assert share_budgets([1.0, 1.0, 1.0], 32, 26) == [11, 11, 10]
    torch.manual_seed(0)
    H, S, B, W = 2, 30, 20, 4
    scores = [torch.cat([torch.rand(H, S - W), torch.full((H, W), 1e6)], 1) for _ in range(3)]
    _, history = cake_cascade([1.0, 1.0, 6.0], scores, B, W)
    assert history[-1] == [15, 15, 30] and sum(history[-1]) == 3 * B


def test_cake_leaves_a_prompt_within_budget_and_window_whole():
    B, W = 20, 4
    method = make_method("cake", budget=B, window_size=W)
    for S, whole in ((24, True), (25, False)):              # the official trigger: S > B + W
        torch.manual_seed(0)
        v = PrefillView(0, 1, torch.randn(S, 2, 4), torch.randn(2, S, 4), torch.arange(S))  # one layer
        assert (method.keep_mask(v) is None) == whole
        assert (method.state_of(v)["cake_budget"] == B).all()   # B for decode either way


def test_cake_decode_scores_pool_the_current_attention_over_older_tokens_by_position():
    from nanokv.methods.base import DecodeStep
    W, S = 3, 10
    method = make_method("cake", budget=8, window_size=W)
    torch.manual_seed(0)
    positions = torch.randperm(S)                           # slot i holds the token at positions[i]
    probs = torch.rand(1, 1, 2, S).softmax(-1)              # two query heads over one kv-head
    q = S - 1
    step = DecodeStep(3, torch.tensor([q]), torch.tensor([6]), positions.view(1, 1, S),
                      torch.ones(1, 1, S, dtype=torch.bool), torch.tensor([8]))
    state = {"cake_budget": torch.full((1, 1, S), 8, dtype=torch.int32)}
    scores, new = method.decode_scores(probs, state, step)
    mean = probs[0, 0].mean(0)                              # GQA mean of the current query's attention
    by_position = {int(p): float(a) for p, a in zip(positions, mean)}
    older = [p for p in range(S) if p <= q - W]             # the newest W are never scored
    for slot, p in enumerate(positions.tolist()):
        if p in older:
            near = [by_position[o] for o in older if abs(o - p) <= 2]
            assert float(scores[0, 0, slot]) == pytest.approx(sum(near) / 5, rel=1e-5)
    assert (new["cake_budget"] == 8).all()


def test_cake_holds_each_layers_budget_while_generating(tiny):
    """The official CakeDecodingKVCache trims every layer back to its budget each step: after 200
    generated tokens every head still holds its layer's share plus the window, which sum to L x B."""
    from tests.test_methods_decode_wave2 import TINY_PROMPTS, serve

    B, W, steps = 16, 4, 200
    method = make_method("cake", budget=B, window_size=W)
    prompts = [[(i * 37 + j * 11) % 256 for j in range(n)] for i, n in enumerate((40, 33, 12))]
    outs, held, preemptions, cache = serve(tiny, method, prompts, 400, steps)
    L = tiny[1].num_layers
    for (lengths, blocks), prompt, out in zip(held, prompts, outs):
        assert len(out) == steps
        assert (lengths == lengths[:, :1]).all()            # every head of a layer at its budget
        if len(prompt) > B + W:
            assert int(lengths[:, 0].sum()) == L * B and len(set(lengths[:, 0].tolist())) > 1
        else:                                                # not compressed: B in every layer
            assert (lengths == B).all()
        assert (blocks == (lengths + 3) // 4).all()          # and only the blocks that holds
    assert cache.pool.num_free == cache.pool.usable_blocks
    # preempted for want of blocks, a request recomputes to the same tokens and the same cache:
    # its generated tokens replay their evictions after the cascade (the runner's second pass)
    # (short prompts grow to their budget while generating: they are what runs out of blocks)
    method = make_method("cake", budget=12, window_size=W)
    roomy, roomy_held, _, _ = serve(tiny, method, TINY_PROMPTS, 400, 20)
    tight, tight_held, tight_preemptions, _ = serve(tiny, method, TINY_PROMPTS, 44, 20)
    assert tight_preemptions > 0 and tight == roomy
    assert all((a[0] == b[0]).all() for a, b in zip(tight_held, roomy_held))


def test_cake_refuses_quantization_and_small_budgets():
    with pytest.raises(ValueError, match="compacts earlier layers"):
        make_method("cake+kivi", budget=64)
    with pytest.raises(ValueError, match="budget=32 must exceed window_size=32"):
        make_method("cake", budget=32)


# --- in the engine ----------------------------------------------------------------------------

PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((120, 64, 160, 90))]
MAX_TOKENS = [4, 1, 2, 1]  # two at a time: 1 ends at once, 2 joins while 0 decodes, then 3


def check_sepllm(method, prompt, layers, keep):
    """Every (layer, head) holds the sinks, the window, the s latest separators before it, and
    the tokens just before the window for the room left."""
    n = len(prompt)
    a, s, w = method.split(keep)
    separators = [p for p in range(a, n - w) if method.separator_ids[prompt[p]]]
    want = set(range(a)) | set(range(n - w, n)) | set(separators[-s:] if s else [])
    p = n - w - 1
    while len(want) < keep:
        want.add(p)
        p -= 1
    assert all(h == sorted(want) for heads in layers for h in heads)
    return len(separators)


@pytest.mark.parametrize("name", ["sepllm", "cake"])
@pytest.mark.slow
def test_runs_under_continuous_batching_and_frees_real_blocks(smollm2_gguf, name):
    from nanokv import LLM
    from tests.test_methods_prefill_wave2 import run_capturing

    options = {"window_size": 8} if name == "cake" else {}
    llm = LLM(str(smollm2_gguf), dtype="float32", method=name, compression=0.5, max_num_seqs=2, **options)
    outs, held, steps = run_capturing(llm, PROMPTS, MAX_TOKENS)
    assert steps[:4] == [([0, 1], True), ([2], True), ([0, 2], False), ([3], True)]
    per_block = llm.cache.pool.bytes_per_block
    L = llm.config.num_layers
    separators = 0
    for prompt, out, layers, max_tokens in zip(PROMPTS, outs, held, MAX_TOKENS):
        n, keep = len(prompt), math.ceil(len(prompt) / 2)
        assert len(out.token_ids) == max_tokens
        prompt_held = [[[p for p in h if p < n] for h in heads] for heads in layers]
        if name == "sepllm":
            separators += check_sepllm(llm.method, prompt, prompt_held, keep)
        else:  # every layer keeps its newest 8; the layers share L x (keep - 8) beyond them
            counts = [len(heads[0]) for heads in layers]
            cached = n + max_tokens - 1                  # the last sampled token is never fed
            assert all(len(h) == c for heads, c in zip(layers, counts) for h in heads)
            assert all(set(range(cached - 8, cached)) <= set(h) for heads in layers for h in heads)
            assert sum(counts) == L * keep and len(set(counts)) > 1
        blocks = sum(math.ceil(len(h) / 16) for heads in layers for h in heads)
        assert out.metrics["kv_cache_bytes"] == blocks * per_block < out.metrics["kv_cache_bytes_uncompressed"]
    if name == "sepllm":
        assert separators > 0                            # the vocabulary marks some of these ids
    for i in (2,):  # compressed the same whatever it shares its steps with (2 was prefilled while 0 decoded)
        _, [alone], _ = run_capturing(llm, [PROMPTS[i]], [MAX_TOKENS[i]])
        assert alone == held[i]
