"""SepLLM and CAKE: keep-sets and budgets on hand-built inputs where the answer is known, and each
one in the engine under continuous batching."""

import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
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
    """Float64, one query head at a time: (preference, token scores [H, prefix])."""
    keys, queries = keys.double(), queries.double()
    H, S, D = keys.shape
    Hq = queries.shape[1]
    P = S - window
    entropies, shifts, token = [], [], torch.zeros(H, P, dtype=torch.float64)
    for hq in range(Hq):
        h = hq // (Hq // H)
        rows = []
        for i in range(S - window, S):                     # query i sees keys 0..i
            logits = keys[h, :i + 1] @ queries[i, hq] / math.sqrt(D)
            rows.append(torch.softmax(logits, 0)[:P])
        A = torch.stack(rows)                              # [W, P]
        entropies.append(float(-(A * A.log()).sum()))
        mean = A.mean(0)
        var = ((A - mean) ** 2).mean(0)
        shifts.append(float(var.sum()))
        token[h] += (mean + gamma * var) / (Hq // H)
    preference = sum(e ** (1 / tau1) * s ** (1 / tau2) for e, s in zip(entropies, shifts)) / Hq
    half = kernel // 2
    pooled = torch.stack([token[:, max(0, j - half):j + half + 1].mean(1) for j in range(P)], dim=1)
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
    # after layer l every seen layer m holds W + floor(64 P_m / sum P): independent arithmetic
    for l, counts in enumerate(history):
        total = sum(preferences[:l + 1])
        assert counts[:l + 1] == [min(S, W + int(64 * p / total)) for p in preferences[:l + 1]]
        assert sum(counts[:l + 1]) <= L * B              # never above the request's total
    assert history[-1] == [12, 28, 20, 20]
    # the final keep-sets: each layer's top of its own scores at its final budget, window included
    for layer, h in enumerate(held):
        for head in range(H):
            want = scores[layer][head].topk(history[-1][layer]).indices.sort().values
            assert h[head].tolist() == want.tolist()
    assert make_method("cake", budget=B, window_size=W).kept_after_prefill(S, 0, L) == math.ceil(B * L / (L - 1))


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
        else:  # every layer keeps its window; the layers share L x (keep - window) beyond it
            counts = [len(heads[0]) for heads in prompt_held]
            assert all(len(h) == c for heads, c in zip(prompt_held, counts) for h in heads)
            assert all(set(range(n - 8, n)) <= set(h) for heads in prompt_held for h in heads)
            assert sum(counts) <= L * keep and len(set(counts)) > 1
        blocks = sum(math.ceil(len(h) / 16) for heads in layers for h in heads)
        assert out.metrics["kv_cache_bytes"] == blocks * per_block < out.metrics["kv_cache_bytes_uncompressed"]
    if name == "sepllm":
        assert separators > 0                            # the vocabulary marks some of these ids
    for i in (2,):  # compressed the same whatever it shares its steps with (2 was prefilled while 0 decoded)
        _, [alone], _ = run_capturing(llm, [PROMPTS[i]], [MAX_TOKENS[i]])
        assert alone == held[i]
