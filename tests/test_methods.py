"""Compression methods: keep-sets on hand-built inputs where the answer is known, option and
budget checking, and real bytes freed in the engine."""

import math

import pytest
import torch

from nanokv.methods import make_method
from nanokv.methods.base import PrefillView


def view(keys, queries=None, layer=5):
    H, S, D = keys.shape
    if queries is None:
        queries = torch.zeros(S, H, D)
    return PrefillView(layer, 30, queries, keys, torch.arange(S))


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_budget_arithmetic():
    assert make_method("knorm", compression=0.5).tokens_to_keep(9) == 5      # ceil((1 - 0.5) * 9)
    assert make_method("knorm", compression=0.75).tokens_to_keep(100) == 25
    assert make_method("knorm", budget=64).tokens_to_keep(40) == 40          # never more than there is
    assert make_method("full").compresses is False
    assert make_method("knorm").compresses is False                          # no budget given: nothing to do
    assert make_method("pyramidkv", compression=0.5, beta=10).beta == 10.0   # an int where a float is asked


def test_streaming_llm_keeps_sinks_and_recent():
    mask = make_method("streaming_llm", budget=8).keep_mask(view(torch.randn(2, 20, 4)))
    assert kept(mask) == [[0, 1, 2, 3, 16, 17, 18, 19]] * 2


def test_knorm_keeps_lowest_norms_per_head():
    norms = torch.tensor([[5., 1., 4., 2., 3., 6.], [1., 2., 3., 4., 5., 6.]])
    keys = torch.zeros(2, 6, 3)
    keys[..., 0] = norms  # one non-zero channel: the norm is that value
    mask = make_method("knorm", budget=3).keep_mask(view(keys))
    assert kept(mask) == [[1, 3, 4], [0, 1, 2]]
    assert make_method("knorm", budget=3).keep_mask(view(keys, layer=1)) is None  # paper: layers 0-1 whole
    assert make_method("knorm", budget=3, skip_layers=0).keep_mask(view(keys, layer=1)) is not None


def test_snapkv_keeps_what_the_window_attends_to():
    # one kv-head, two query heads (GQA). Keys 3 and 7 point along the queries' direction;
    # all others are orthogonal to it. The last 2 tokens are the observation window.
    S, D = 12, 4
    keys = torch.zeros(1, S, D)
    keys[0, :, 1] = 1.0
    keys[0, 3] = torch.tensor([8.0, 0, 0, 0])
    keys[0, 7] = torch.tensor([6.0, 0, 0, 0])
    queries = torch.zeros(S, 2, D)
    queries[:, :, 0] = 1.0
    method = make_method("snapkv", budget=4, window_size=2, kernel_size=1)
    assert kept(method.keep_mask(view(keys, queries))) == [[3, 7, 10, 11]]
    # max pooling over 3 spreads token 3's score to tokens 2 and 4, which then beat token 7

    pooled = make_method("snapkv", budget=5, window_size=2, kernel_size=3)
    assert kept(pooled.keep_mask(view(keys, queries))) == [[2, 3, 4, 10, 11]]


def test_pyramidkv_budgets_fall_with_depth_and_keep_the_total():
    # B=50, W=8, beta=20: min = 42/20 = 2.1, max = 84 - 2.1 = 81.9, step (81.9 - 2.1)/3 = 26.6
    method = make_method("pyramidkv", budget=50)
    assert [method.layer_budget(100, layer, 4) for layer in range(4)] == [8 + 81, 8 + 55, 8 + 28, 8 + 2]
    # a prompt too short for layer 0's share (8 + 81.9 > 60): every layer keeps B, like SnapKV
    assert [method.layer_budget(60, layer, 4) for layer in range(4)] == [50] * 4
    keys = torch.randn(2, 100, 4)
    for layer, expected in enumerate([89, 63, 36, 10]):
        mask = method.keep_mask(PrefillView(layer, 4, torch.randn(100, 4, 4), keys, torch.arange(100)))
        assert mask.sum(-1).tolist() == [expected] * 2


def adakv_with_scores(scores, **options):
    method = make_method("adakv", budget=8, window_size=2, kernel_size=1, **options)
    method.scores = lambda view: scores  # the selection on its own, over known scores
    H, S = scores.shape
    return method.keep_mask(PrefillView(5, 30, torch.zeros(S, 2 * H, 4), torch.zeros(H, S, 4), torch.arange(S)))


def test_adakv_gives_the_layer_budget_to_the_best_scores_across_heads():
    inf = float("inf")
    # head 0 has 18 strong scores 10, 9, ..., head 1 only weak ones; the last 2 are the window
    head0 = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, .9, .8, .7, .6, .5, .4, .3, .2, inf, inf]
    head1 = [.05 - .001 * i for i in range(18)] + [inf, inf]
    scores = torch.tensor([head0, head1])
    # budget 8 a head -> 16 for the layer; floor int(8 * 0.2) = 1 is taken by the window
    assert kept(adakv_with_scores(scores)) == [list(range(12)) + [18, 19], [18, 19]]
    # floor int(8 * 0.5) = 4: each head first keeps its own best 4 (window + 2), the rest is global
    assert kept(adakv_with_scores(scores, alpha_safeguard=0.5)) == [list(range(10)) + [18, 19], [0, 1, 18, 19]]


def test_random_keeps_exactly_budget_and_repeats_with_seed():
    keys = torch.randn(3, 50, 4)
    a = make_method("random", budget=10).keep_mask(view(keys))
    b = make_method("random", budget=10).keep_mask(view(keys))
    c = make_method("random", budget=10, seed=1).keep_mask(view(keys))
    assert a.sum(-1).tolist() == [10, 10, 10]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="magic"), "unknown method 'magic'; valid: full, random"),
    (dict(name="snapkv", windw=3), "unknown option 'windw'.*valid: window_size"),
    (dict(name="snapkv", window_size="abc"), "window_size='abc'.*must be int"),
    (dict(name="snapkv", kernel_size=4), "kernel_size=4.*odd"),
    (dict(name="snapkv", pooling="mean"), "'max' or 'avg'"),
    (dict(name="knorm", compression=1.0), r"compression must be in \[0, 1\)"),
    (dict(name="knorm", compression=-0.1), r"compression must be in \[0, 1\)"),
    (dict(name="knorm", budget=0), "budget must be a positive"),
    (dict(name="knorm", budget=8, compression=0.5), "either compression or budget"),
    (dict(name="snapkv", budget=16), "budget=16 must exceed window_size=32"),
    (dict(name="streaming_llm", budget=4), "budget=4 must exceed sink_tokens=4"),
    (dict(name="full", compression=0.5), "'full' does not compress"),
])
def test_bad_method_settings_name_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(**kwargs)


# --- in the engine ------------------------------------------------------------------------

PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((180, 95, 240, 130))]


@pytest.fixture(scope="module")
def snapkv_llm(smollm2_gguf):
    from nanokv import LLM

    return LLM(str(smollm2_gguf), dtype="float32", method="snapkv", compression=0.5, window_size=8)


def test_adakv_runs_in_the_engine_with_heads_of_different_lengths(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), dtype="float32", method="adakv", compression=0.5, window_size=8)
    held = []
    original = llm.scheduler.finish
    llm.scheduler.finish = lambda seq: (held.append(llm.cache.seqs[seq.id].lengths.clone()), original(seq))
    [out] = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=1, ignore_eos=True))
    lengths = held[0]  # [layers, kv-heads] tokens each head kept
    assert (lengths.amax(1) != lengths.amin(1)).any()       # some layer's heads differ in length
    assert (lengths.sum(1) <= 3 * 120).all()                 # each layer keeps its total: 3 heads x 120
    assert out.metrics["kv_cache_bytes"] < out.metrics["kv_cache_bytes_uncompressed"]


def test_compression_frees_real_blocks(snapkv_llm):
    from nanokv import SamplingParams

    outs = snapkv_llm.generate(PROMPTS, SamplingParams(max_tokens=1, ignore_eos=True))
    per_block = snapkv_llm.cache.pool.bytes_per_block
    for prompt, out in zip(PROMPTS, outs):
        # every (layer, head) keeps ceil(n / 2) tokens, held in 16-token blocks
        kept_blocks = 30 * 3 * math.ceil(math.ceil(len(prompt) / 2) / 16)
        full_blocks = 30 * 3 * math.ceil(len(prompt) / 16)
        assert out.metrics["kv_cache_bytes"] == kept_blocks * per_block
        assert out.metrics["kv_cache_bytes_uncompressed"] == full_blocks * per_block


def test_preempted_sequences_are_compressed_again_the_same_way(snapkv_llm, smollm2_gguf):
    from nanokv import LLM, SamplingParams

    # short prompts, long outputs: admitted uncompressed (3 blocks a head), compressed to 20
    # tokens, then grown by 80 to 7 blocks a head, so 1500 blocks cannot hold them all
    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(40)] for i in range(8)]
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    roomy = snapkv_llm.generate(prompts, params)
    small = LLM(str(smollm2_gguf), dtype="float32", method="snapkv", compression=0.5, window_size=8,
                kv_cache_memory=1500 * 16 * 64 * 2 * 4)
    tight = small.generate(prompts, params)
    assert small.stats["preemptions"] > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
