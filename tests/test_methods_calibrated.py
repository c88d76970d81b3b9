"""DuoAttention and HeadKV: which heads stream and how many tokens each head keeps, from hand-made
head scores where the answer follows from the formulas by hand; and both in the engine under
continuous batching with an artifact named by calibration_file."""

import json
import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.base import PrefillView


def kept(mask, S, H=2):
    """Per head, the slots a keep mask keeps (None: all S)."""
    if mask is None:
        return [list(range(S))] * H
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def bound(name, scores, **options):
    method = make_method(name, **options)
    method.bind_calibration({"head_scores": scores})
    return method


def prompt_view(layer, S, H=2, num_layers=3):
    return PrefillView(layer, num_layers, torch.zeros(S, 2 * H, 4), torch.zeros(H, S, 4), torch.arange(S))


# --- duoattention -----------------------------------------------------------------------------

SCORES = [[0.9, 0.1], [0.5, 0.3], [0.2, 0.8]]        # by rank: (0,1) 0.1, (2,0) 0.2, (1,1) 0.3, (1,0) 0.5, ...


@pytest.mark.parametrize("setting, streaming", [
    # n = 20, sink 2 + recent 4 = 6: f = (20 - 13) / 14 = 0.5 -> round(0.5 x 6) = 3 heads stream
    ({"budget": 13}, [(0, 1), (2, 0), (1, 1)]),
    # compression 0.5 keeps B = 10: f = 10 / 14 -> round(4.29) = 4 heads
    ({"compression": 0.5}, [(0, 1), (2, 0), (1, 1), (1, 0)]),
    # B = 6 = sink + recent: f = 1, every head streams
    ({"budget": 6}, [(l, h) for l in range(3) for h in range(2)]),
    # B >= n: nothing to remove
    ({"budget": 20}, []),
])
def test_duoattention_streams_the_lowest_scoring_heads_of_the_model(setting, streaming):
    S = 20
    method = bound("duoattention", SCORES, sink_size=2, recent_size=4, **setting)
    for layer in range(3):
        heads = kept(method.keep_mask(prompt_view(layer, S)), S)
        for h in range(2):
            want = [0, 1, 16, 17, 18, 19] if (layer, h) in streaming else list(range(S))
            assert heads[h] == want, (layer, h)
        n_streaming = sum(1 for l, _ in streaming if l == layer)
        # the scheduler plans with the layer's exact mean (rounded up)
        assert method.kept_after_prefill(S, layer, 3) == math.ceil(((2 - n_streaming) * S + n_streaming * 6) / 2)


def test_duoattention_keeps_short_prompts_whole_and_checks_its_budget():
    method = bound("duoattention", SCORES, sink_size=2, recent_size=4, compression=0.9)
    assert method.keep_mask(prompt_view(0, 6)) is None              # at most sink + recent: all kept
    assert method.kept_after_prefill(6, 0, 3) == 6
    with pytest.raises(ValueError, match="budget=5 must be at least sink_size \\+ recent_size = 6"):
        make_method("duoattention", budget=5, sink_size=2, recent_size=4)
    with pytest.raises(ValueError, match="no calibration"):
        make_method("duoattention", budget=8, sink_size=2, recent_size=4).keep_mask(prompt_view(0, 20))


# --- headkv -----------------------------------------------------------------------------------

def test_headkv_head_budgets_follow_the_global_pool_formula():
    # shares: [[1, 0], [3, 0]] / 4 = [[0.25, 0], [0.75, 0]]; B = 40, W = 8: base = 32
    scores = [[1.0, 0.0], [3.0, 0.0]]
    # beta 2: each head puts 32 // 2 = 16 in a pool of 64 and keeps 16: 16 + 0.25 x 64 = 32, 16 + 48 = 64
    method = bound("headkv", scores, budget=40, window_size=8, beta=2.0)
    assert method.head_capacities(100).tolist() == [[32, 16], [64, 16]]
    # beta 1.5: 32 // 1.5 = 21 pooled (84 in all), 11 kept: 11 + 21 = 32, 11, 11 + 63 = 74, 11
    method = bound("headkv", scores, budget=40, window_size=8, beta=1.5)
    assert method.head_capacities(100).tolist() == [[32, 11], [74, 11]]
    # a head's capacity stops at its prefix (50 - 8 = 42): not handed on
    assert method.head_capacities(50).tolist() == [[32, 11], [42, 11]]
    # temp 2: shares 1 : 9 -> 11 + round(0.1 x 84) = 19, 11 + round(75.6) = 87
    method = bound("headkv", scores, budget=40, window_size=8, beta=1.5, temp=2.0)
    assert method.head_capacities(100).tolist() == [[19, 11], [87, 11]]
    # a profile of zeros shares the pool evenly: 11 + 21 each
    method = bound("headkv", [[0.0, 0.0], [0.0, 0.0]], budget=40, window_size=8, beta=1.5)
    assert method.head_capacities(100).tolist() == [[32, 32], [32, 32]]
    # the scheduler's plan: the window plus the layer's mean capacity, rounded up
    method = bound("headkv", scores, budget=40, window_size=8, beta=1.5)
    assert [method.kept_after_prefill(100, layer, 2) for layer in (0, 1)] == [8 + 22, 8 + 43]


def test_headkv_keeps_each_heads_top_prefix_tokens_and_the_window():
    S, W = 30, 4
    scores = [[1.0, 0.0], [3.0, 0.0]]
    method = bound("headkv", scores, budget=10, window_size=W, beta=2.0)
    # base 6, 3 pooled (12 in all), 3 kept: layer 1 -> [3 + 9, 3], layer 0 -> [3 + 3, 3]
    assert method.head_capacities(S).tolist() == [[6, 3], [12, 3]]
    token_scores = torch.stack([torch.randperm(S).float() for _ in range(2)])
    method.scores = lambda view: token_scores                  # hand-made SnapKV scores
    for layer, capacity in ((0, [6, 3]), (1, [12, 3])):
        mask = method.keep_mask(prompt_view(layer, S, num_layers=2))
        for h in range(2):
            best = token_scores[h, :S - W].topk(capacity[h]).indices.tolist()
            assert kept(mask, S)[h] == sorted(best + list(range(S - W, S)))
    assert method.keep_mask(prompt_view(0, 10, num_layers=2)) is None      # within budget
    small = bound("headkv", scores, compression=0.9, window_size=W)       # keeps 3 of 30: under the window
    assert kept(small.keep_mask(prompt_view(0, S, num_layers=2)), S) == [[27, 28, 29]] * 2
    with pytest.raises(ValueError, match="must exceed window_size"):
        make_method("headkv", budget=8)


# --- in the engine ----------------------------------------------------------------------------

PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((120, 64, 160, 90))]
MAX_TOKENS = [4, 1, 2, 1]  # two at a time: 1 ends at once, 2 joins while 0 decodes, then 3


@pytest.fixture(scope="module")
def smollm2_scores():
    """A hand-made profile for SmolLM2's 30 layers x 3 kv-heads: distinct, in no particular order."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(30, 3, generator=g, dtype=torch.float64)


def artifact_file(tmp_path, method, scores):
    path = tmp_path / f"{method}.json"
    path.write_text(json.dumps({"format": 1, "method": method, "model": "smollm2-135m", "num_layers": 30,
                                "num_kv_heads": 3, "head_scores": scores.tolist(), "settings": {}}))
    return path


@pytest.mark.parametrize("name", ["duoattention", "headkv"])
@pytest.mark.slow
def test_runs_under_continuous_batching_and_frees_real_blocks(smollm2_gguf, smollm2_scores, tmp_path, name):
    from nanokv import LLM
    from test_methods_prefill_wave2 import run_capturing

    options = {"sink_size": 4, "recent_size": 16} if name == "duoattention" else {"window_size": 8}
    llm = LLM(str(smollm2_gguf), dtype="float32", method=name, compression=0.5, max_num_seqs=2,
              calibration_file=str(artifact_file(tmp_path, name, smollm2_scores)), **options)
    outs, held, steps = run_capturing(llm, PROMPTS, MAX_TOKENS)
    assert steps[:4] == [([0, 1], True), ([2], True), ([0, 2], False), ([3], True)]
    per_block = llm.cache.pool.bytes_per_block
    order = sorted(range(90), key=lambda i: float(smollm2_scores.flatten()[i]))   # lowest score first
    for prompt, out, layers, max_tokens in zip(PROMPTS, outs, held, MAX_TOKENS):
        n, keep = len(prompt), math.ceil(len(prompt) / 2)
        assert len(out.token_ids) == max_tokens
        generated = set(range(n, n + max_tokens - 1))               # the last token is sampled, never cached
        assert all(generated <= set(h) for heads in layers for h in heads)
        prompt_held = [[[p for p in h if p < n] for h in heads] for heads in layers]
        if name == "duoattention":   # f = (n - keep) / (n - 20) of the 90 heads stream, the lowest-scoring
            streaming = set(order[:round((n - keep) / (n - 20) * 90)])
            for layer, heads in enumerate(prompt_held):
                for h, positions in enumerate(heads):
                    want = [0, 1, 2, 3] + list(range(n - 16, n)) if 3 * layer + h in streaming else list(range(n))
                    assert positions == want
                total = sum(len(p) for p in heads)
                assert llm.method.kept_after_prefill(n, layer, 30) == math.ceil(total / 3)
        else:                        # each head: the window plus its capacity from the global pool
            base = keep - 8
            pooled = base // 1.5
            shares = smollm2_scores / smollm2_scores.sum()
            capacity = torch.round(shares * (pooled * 90) + (base - pooled)).clamp(max=n - 8)
            for layer, heads in enumerate(prompt_held):
                for h, positions in enumerate(heads):
                    assert len(positions) == 8 + int(capacity[layer, h])
                    assert set(range(n - 8, n)) <= set(positions)
            assert len({len(p) for heads in prompt_held for p in heads}) > 1   # heads really differ
        blocks = sum(math.ceil(len(h) / 16) for heads in layers for h in heads)
        assert out.metrics["kv_cache_bytes"] == blocks * per_block < out.metrics["kv_cache_bytes_uncompressed"]
    for i in (2,):  # compressed the same whatever it shares its steps with (2 was prefilled while 0 decoded)
        _, [alone], _ = run_capturing(llm, [PROMPTS[i]], [MAX_TOKENS[i]])
        assert alone == held[i]


@pytest.mark.slow
def test_a_profile_for_another_shape_is_refused_by_llm(smollm2_gguf, tmp_path):
    from nanokv import LLM

    path = tmp_path / "small.json"
    path.write_text(json.dumps({"format": 1, "method": "headkv", "model": "smollm2-135m", "num_layers": 2,
                                "num_kv_heads": 3, "head_scores": [[0, 0, 0]] * 2, "settings": {}}))
    with pytest.raises(ValueError, match="is for 2 layers x 3 kv-heads, but model .* has 30 x 3"):
        LLM(str(smollm2_gguf), dtype="float32", method="headkv", compression=0.5, calibration_file=str(path))
