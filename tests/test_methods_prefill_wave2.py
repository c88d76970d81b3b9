"""SAGE-KV, NACL, SimLayerKV and ChunkKV: keep-sets on hand-built inputs where the answer is
known, option and budget checking, and each one in the engine under continuous batching."""

import math

import pytest
import torch

from helpers import held_positions
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView


def view(keys, queries, layer=5, state=None):
    H, S, D = keys.shape
    return PrefillView(layer, 30, queries, keys, torch.arange(S), sequence_state={} if state is None else state)


def kept(mask):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def last_query_logits(logits, query_heads=1):
    """Keys and queries [S, Hq, 4] whose last query's logit on token j is logits[h][j] in kv-head
    h (q = e0 and k_j = 2 logit e0, the scale being 1/sqrt(4)); the earlier queries point along e1."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    H, S = logits.shape
    keys = torch.zeros(H, S, 4)
    keys[..., 0] = 2 * logits
    queries = torch.zeros(S, H * query_heads, 4)
    queries[:-1, :, 1] = 1.0
    queries[-1, :, 0] = 1.0
    return keys, queries


# --- sage_kv ----------------------------------------------------------------------------------

def test_sage_kv_keeps_sinks_recent_and_each_heads_top_k_by_the_last_query():
    S = 20
    logits = torch.zeros(2, S)
    logits[:, :2] = logits[:, 17:] = -10.0          # sinks and recent window: little attention, kept anyway
    logits[0, 6], logits[0, 9] = 5.0, 4.0            # kv-head 0's favourites
    logits[1, 4], logits[1, 12] = 5.0, 4.0           # kv-head 1's
    keys, queries = last_query_logits(logits, query_heads=2)
    keys[:, 3, 1] = 50.0                             # what every earlier query attends to: not the last one
    method = make_method("sage_kv", budget=7, sink_tokens=2, recent_tokens=3)
    assert kept(method.keep_mask(view(keys, queries))) == [[0, 1, 6, 9, 17, 18, 19], [0, 1, 4, 12, 17, 18, 19]]
    # a budget under sinks + recent (compression 0.8 of 20 keeps 4): the sinks, then the newest
    small = make_method("sage_kv", compression=0.8, sink_tokens=2, recent_tokens=3)
    assert kept(small.keep_mask(view(keys, queries))) == [[0, 1, 18, 19]] * 2


# --- nacl -------------------------------------------------------------------------------------

def test_nacl_without_random_keeps_sinks_the_proxy_window_and_what_the_proxies_attend_to():
    S = 100                                          # proxy_ratio 0.05: the last 5 tokens are the proxies
    keys = torch.zeros(1, S, 4)
    keys[0, [30, 50, 70], 0] = 8.0                   # the proxies look along e0
    keys[0, 20, 0] = 4.0                             # fourth best: left out
    keys[0, 40, 1] = 50.0                            # what an earlier (non-proxy) query looks at
    queries = torch.zeros(S, 1, 4)
    queries[-5:, 0, 0] = 1.0
    queries[80, 0, 1] = 1.0
    method = make_method("nacl", budget=10, sink_tokens=2, proxy_ratio=0.05, random_ratio=0.0)
    assert kept(method.keep_mask(view(keys, queries))) == [[0, 1, 30, 50, 70, 95, 96, 97, 98, 99]]


def test_nacl_proxies_attend_both_ways_as_the_official_code():
    # proxies 18 and 19 (proxy_ratio 0.1 of 20); budget 4 = sink 0 + the proxies + one by score.
    # Proxy 18 looks at token 5, and far more at proxy 19: causal, 5 would take most of its
    # attention and win; the official proxies' softmax runs over every key (flash_attn with
    # causal=False), so 19 draws it off and token 8, proxy 19's choice, wins
    S = 20
    keys = torch.zeros(1, S, 4)
    keys[0, 5, 0], keys[0, 19, 0], keys[0, 8, 1] = 10.0, 20.0, 6.0   # logits 5, 10 (for q = e0), 3 (q = e1)
    queries = torch.zeros(S, 1, 4)
    queries[18, 0, 0] = queries[19, 0, 1] = 1.0
    method = make_method("nacl", budget=4, sink_tokens=1, proxy_ratio=0.1, random_ratio=0.0)
    assert kept(method.keep_mask(view(keys, queries))) == [[0, 8, 18, 19]]


def nacl_with_scores(scores, seed, **options):
    method = make_method("nacl", seed=seed, **options)
    method.scores = lambda view: scores              # the selection on its own, over known scores
    H, S = scores.shape
    return method.keep_mask(PrefillView(5, 30, torch.zeros(S, H, 4), torch.zeros(H, S, 4), torch.arange(S)))


def test_nacl_draws_the_random_share_in_proportion_to_exp_of_the_proxy_score():
    # 12 tokens: sink 0 and proxy 11 protected; budget 4 leaves 2, random_ratio 0.5: token 5 by
    # its proxy score, one drawn among the other 9 with probability softmax(score): token 3 has
    # weight e^log4 = 4, token 7 weight 2, the 7 others weight 1 -> 4/13, 2/13, 1/13
    scores = torch.zeros(1, 12)
    scores[0, 5], scores[0, 3], scores[0, 7] = 10.0, math.log(4), math.log(2)
    options = dict(budget=4, sink_tokens=1, proxy_ratio=0.01, random_ratio=0.5)
    counts = torch.zeros(12)
    for seed in range(3000):
        mask = nacl_with_scores(scores, seed, **options)[0]
        assert mask.sum() == 4 and mask[[0, 5, 11]].all()
        counts += mask
    drawn = counts / 3000
    assert drawn[[0, 5, 11]].tolist() == [1.0, 1.0, 1.0]
    expected = torch.tensor([4, 2] + [1] * 7) / 13
    others = [i for i in range(12) if i not in (0, 5, 11, 3, 7)]
    assert torch.allclose(drawn[[3, 7] + others], expected, atol=0.03), drawn
    # seeded: the same seed draws the same, another seed something else (on many heads)
    wide = torch.rand(4, 200)
    wide_options = dict(budget=60, sink_tokens=4)
    assert torch.equal(nacl_with_scores(wide, 0, **wide_options), nacl_with_scores(wide, 0, **wide_options))
    assert not torch.equal(nacl_with_scores(wide, 0, **wide_options), nacl_with_scores(wide, 1, **wide_options))
    assert nacl_with_scores(wide, 0, **wide_options).sum(-1).tolist() == [60] * 4


# --- simlayerkv -------------------------------------------------------------------------------

def simlayerkv_case(logits, **options):
    """Two kv-heads, 40 tokens; budget 12: a lazy layer keeps sinks 0-3 and tokens 32-39."""
    keys, queries = last_query_logits(torch.as_tensor(logits, dtype=torch.float32).expand(2, 40))
    method = make_method("simlayerkv", budget=12, **options)
    v = view(keys, queries)
    return method.lazy_mass(v, 12), method.keep_mask(v)


def mass(logits, tokens):
    w = torch.as_tensor(logits, dtype=torch.float64).exp()
    return float(w[tokens].sum() / w.sum())


def test_simlayerkv_a_lazy_layer_keeps_sinks_and_recent_and_another_stays_whole():
    sinks_recent = list(range(4)) + list(range(32, 40))
    lazy = [3.0] * 4 + [-2.0] * 28 + [2.0] * 8                          # mass 0.986
    got, mask = simlayerkv_case(lazy)
    assert got == pytest.approx(mass(lazy, sinks_recent), abs=1e-6) and got > 0.9
    assert kept(mask) == [sinks_recent] * 2
    busy = [3.0] * 4 + [1.0] * 28 + [2.0] * 8                           # mass 0.61: the middle matters
    got, mask = simlayerkv_case(busy)
    assert got == pytest.approx(mass(busy, sinks_recent), abs=1e-6) and mask is None
    assert make_method("simlayerkv", budget=12).kept_after_prefill(40, 3, 30) == 40  # planned whole


def test_simlayerkv_kvpress_criterion_measures_the_tokens_before_the_last():
    # kvpress (n_last=1, n_recent = 12 - 4 + 1 = 9): the sinks and tokens 30-38, not the last
    # token's attention to itself. Tokens 30 and 31 draw the attention: lazy for kvpress (mass
    # 0.97), not for the tokens a lazy layer keeps (0.014); kvpress then keeps 0-3 and 32-39
    logits = [0.0] * 40
    logits[30] = logits[31] = 6.0
    got, mask = simlayerkv_case(logits, criterion="kvpress")
    assert got == pytest.approx(mass(logits, list(range(4)) + list(range(30, 39))), abs=1e-6)
    assert kept(mask) == [list(range(4)) + list(range(32, 40))] * 2
    got, mask = simlayerkv_case(logits)
    assert got == pytest.approx(mass(logits, list(range(4)) + list(range(32, 40))), abs=1e-6) and mask is None
    # the last token's attention to itself counts for the kept tokens, not for kvpress
    itself = [0.0] * 39 + [5.0]                                          # kept-token mass 0.85
    assert simlayerkv_case(itself, threshold=0.8)[1] is not None
    assert simlayerkv_case(itself, threshold=0.8, criterion="kvpress")[1] is None


# --- chunkkv ----------------------------------------------------------------------------------

def chunkkv_with_scores(scores_at, layers, state=None, **options):
    """Masks of layers 0..layers-1 of one sequence, scores_at(layer) [H, S] the scores."""
    method = make_method("chunkkv", window_size=1, **options)
    method.scores = lambda view: scores_at(view.layer)
    state = {} if state is None else state
    H, S = scores_at(0).shape
    return [method.keep_mask(PrefillView(layer, 30, torch.zeros(S, H, 4), torch.zeros(H, S, 4), torch.arange(S),
                                         sequence_state=state)) for layer in range(layers)]


def test_chunkkv_keeps_whole_chunks_by_their_mean_score_over_heads_the_same_in_every_head():
    # 23 tokens in chunks of 5: [0-4] [5-9] [10-14] [15-19] [20-22]; budget 11 holds 2 chunks
    scores = torch.zeros(2, 23)
    scores[0, 7] = 10.0                  # chunk 1: one strong token in head 0, mean 10/5 = 2
    scores[:, 10:15] = 0.75              # chunk 2: mean 1.5
    scores[:, 15:20] = 0.9               # chunk 3: mean 1.8 (sum 9)
    scores[:, 20:23] = 1.05              # the short chunk 4: mean 2.1 (sum 6.3)
    [mask] = chunkkv_with_scores(lambda layer: scores, 1, budget=11, chunk_length=5)
    # by the mean (kvpress): chunks 4 and 1; a per-head top-k or chunk sums would differ
    assert kept(mask) == [[5, 6, 7, 8, 9, 20, 21, 22]] * 2
    # under one chunk of budget: SnapKV's token-level top-k per head
    [tokens] = chunkkv_with_scores(lambda layer: scores, 1, budget=4, chunk_length=5)
    assert tokens.sum(-1).tolist() == [4, 4] and tokens[0, 7]


def test_chunkkv_max_pools_each_query_head_before_the_group_mean():
    # SnapKV's scores under chunkkv's default max pooling, GQA (2 kv-heads of 3 query heads):
    # each query head's window attention pooled, then the group averaged (kvpress's order; the
    # group's mean pooled would differ for max pooling)
    from nanokv.methods.base import observation_attention

    gen = torch.Generator().manual_seed(3)
    S, window = 40, 4
    v = view(torch.randn(2, S, 8, generator=gen), torch.randn(S, 6, 8, generator=gen))
    method = make_method("chunkkv", budget=20, window_size=window, kernel_size=5, pooling="max")
    attention = observation_attention(v, window).mean(dim=1)[:, None, :S - window]     # [Hq, 1, S - w]
    pooled = torch.nn.functional.max_pool1d(attention, 5, stride=1, padding=2)[:, 0]
    torch.testing.assert_close(method.scores(v)[:, :S - window], pooled.view(2, 3, -1).mean(dim=1))


def test_chunkkv_the_window_scores_one_above_the_best_prefix_score():
    torch.manual_seed(0)
    S, W = 40, 4
    v = view(torch.randn(2, S, 8), torch.randn(S, 4, 8))
    snap = make_method("snapkv", budget=20, window_size=W).scores(v)
    chunk = make_method("chunkkv", budget=20, window_size=W).scores(v)
    assert torch.equal(chunk[:, :-W], snap[:, :-W])
    assert torch.equal(chunk[:, -W:], torch.full((2, W), float(snap[:, :-W].max()) + 1))


def test_chunkkv_layers_reuse_the_selecting_layers_chunks_per_sequence():
    def scores_at(layer):  # each layer prefers chunk `layer` of four
        s = torch.zeros(2, 20)
        s[:, 5 * layer:5 * layer + 5] = 1.0
        return s

    def chunks(masks):
        return [kept(m)[0][0] // 5 for m in masks]

    assert chunks(chunkkv_with_scores(scores_at, 4, budget=5, chunk_length=5)) == [0, 1, 2, 3]
    assert chunks(chunkkv_with_scores(scores_at, 4, budget=5, chunk_length=5, reuse_layers=2)) == [0, 0, 2, 2]
    assert chunks(chunkkv_with_scores(scores_at, 4, budget=5, chunk_length=5, reuse_layers=3)) == [0, 0, 0, 3]


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="sage_kv", budget=36), "budget=36 must exceed sink_tokens \\+ recent_tokens = 36"),
    (dict(name="sage_kv", recent_tokens=0), "recent_tokens=0.*>= 1"),
    (dict(name="nacl", proxy_ratio=0.0), r"proxy_ratio=0.0.*\(0, 1\]"),
    (dict(name="nacl", random_ratio=1.5), r"random_ratio=1.5.*\[0, 1\]"),
    (dict(name="nacl", budget=4), "budget=4 must exceed sink_tokens=4 for nacl"),
    (dict(name="simlayerkv", threshold=1.2), r"threshold=1.2.*\[0, 1\]"),
    (dict(name="simlayerkv", criterion="paper"), "'kept' or 'kvpress'"),
    (dict(name="simlayerkv", budget=3), "budget=3 must exceed sink_tokens=4 for simlayerkv"),
    (dict(name="chunkkv", chunk_length=0), "chunk_length=0.*>= 1"),
    (dict(name="chunkkv", reuse_layers="two"), "reuse_layers='two'.*must be int"),
    (dict(name="chunkkv", budget=16), "budget=16 must exceed window_size=32 for chunkkv"),
])
def test_bad_settings_name_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(**kwargs)


# --- in the engine ----------------------------------------------------------------------------

PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((120, 64, 160, 90))]
MAX_TOKENS = [4, 1, 2, 1]  # two at a time: 1 ends at once, 2 joins while 0 decodes, then 3
ENGINE = {"sage_kv": {}, "nacl": {}, "simlayerkv": {}, "chunkkv": {"reuse_layers": 2}}


def run_capturing(llm, prompts, max_tokens):
    """Outputs; per prompt the positions each (layer, head) holds at the end [L][H]; and the
    steps run, (prompt indices, is_prefill)."""
    from nanokv import SamplingParams

    held, steps = {}, []
    finish, schedule = llm.scheduler.finish, llm.scheduler.schedule

    def scheduled():
        batch, is_prefill = schedule()
        steps.append(([s.id for s in batch], is_prefill))
        return batch, is_prefill

    def capture(seq):
        held[seq.id] = held_positions(llm.cache, seq.id)
        finish(seq)

    llm.scheduler.finish, llm.scheduler.schedule = capture, scheduled
    try:
        outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    finally:
        del llm.scheduler.finish, llm.scheduler.schedule
    ids = sorted(held)  # given in the order of the prompts
    return outs, [held[i] for i in ids], [([ids.index(i) for i in batch], p) for batch, p in steps if batch]


def check_kept(method, n, layers):
    """What the method keeps of an n-token prompt, compression 0.5: [L][H] prompt positions."""
    keep = math.ceil(n / 2)
    for layer, heads in enumerate(layers):
        if method == "sage_kv":  # 4 sinks and 32 recent (fewer recent when the budget is smaller)
            assert all(len(h) == keep and set(range(4)) | set(range(n - min(32, keep - 4), n)) <= set(h)
                       for h in heads)
        elif method == "nacl":  # 1% of the prompt (one token) are the proxies
            assert all(len(h) == keep and set(range(4)) | {n - 1} <= set(h) for h in heads)
        elif method == "simlayerkv":
            lazy = list(range(4)) + list(range(n - (keep - 4), n))
            assert heads in ([list(range(n))] * len(heads), [lazy] * len(heads))
        else:  # chunkkv, chunks of 10, 2 layers to a selection
            assert all(h == heads[0] for h in heads) and len(heads[0]) <= keep
            assert all(set(range(c, min(c + 10, n))) <= set(heads[0]) for c in {p - p % 10 for p in heads[0]})
            assert layer % 2 == 0 or heads == layers[layer - 1]


@pytest.mark.parametrize("method", list(ENGINE))
@pytest.mark.slow
def test_runs_under_continuous_batching_and_frees_real_blocks(smollm2_gguf, method):
    from nanokv import LLM

    llm = LLM(str(smollm2_gguf), dtype="float32", method=method, compression=0.5, max_num_seqs=2, **ENGINE[method])
    outs, held, steps = run_capturing(llm, PROMPTS, MAX_TOKENS)
    assert steps[:4] == [([0, 1], True), ([2], True), ([0, 2], False), ([3], True)]
    per_block = llm.cache.pool.bytes_per_block
    lazy_layers = 0
    for prompt, out, layers, max_tokens in zip(PROMPTS, outs, held, MAX_TOKENS):
        n = len(prompt)
        assert len(out.token_ids) == max_tokens
        check_kept(method, n, [[[p for p in h if p < n] for h in heads] for heads in layers])
        blocks = sum(math.ceil(len(h) / 16) for heads in layers for h in heads)
        assert out.metrics["kv_cache_bytes"] == blocks * per_block < out.metrics["kv_cache_bytes_uncompressed"]
        lazy_layers += sum(len([p for p in heads[0] if p < n]) < n for heads in layers)
    if method == "simlayerkv":  # SmolLM2 on these prompts: some layers lazy at 0.9, some not
        assert 0 < lazy_layers < 4 * 30
    # a prompt is compressed the same whatever it shares its steps with: 1 was prefilled with 0,
    # 2 while 0 decoded; alone, each holds the same positions
    for i in (1, 2):
        _, [alone], _ = run_capturing(llm, [PROMPTS[i]], [MAX_TOKENS[i]])
        assert alone == held[i]
