"""GemFilter and FastKV (nanokv/methods/gemfilter.py, fastkv.py): the picks on hand-built views
(GemFilter: the last query's raw q . k summed over every query head, average-pooled; FastKV: the
observation window always goes on, the rest by window scores summed over the heads, a later
layer's budget counted from the whole prompt); in the engine, a plain restatement's greedy tokens,
`full`'s where the budget covers the prompt, what each layer holds, preemption, and option errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import DenseLayers, assert_preemption_repeats, generate_holding, restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView

PROMPTS = [[(7 * i + 3 * n) % 250 + 3 for i in range(n)] for n in (48, 90, 120)]
STEPS = 12


def view(queries, keys, layer=0, num_layers=2, state=None):
    """A prompt from an empty cache: queries [T, Hq, D], keys [H, T, D], positions 0 .. T - 1."""
    T = keys.shape[1]
    return PrefillView(layer, num_layers, queries, keys, torch.arange(T), sequence_state={} if state is None else state)


def picked(mask):
    return mask.nonzero().flatten().tolist()


@pytest.fixture
def make(tiny_gqa_dir):
    from nanokv import LLM

    return lambda method="full", **kw: LLM(str(tiny_gqa_dir), dtype="float32", method=method, **kw)


def greedy(llm, prompts=PROMPTS, steps=STEPS):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


class Capture(DenseLayers):
    """Dense attention that keeps each layer's prompt queries and keys (after RoPE)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = {}, {}

    def __call__(self, layer, q, k, v, sliding_window):
        self.q[layer], self.k[layer] = q, k
        return super().__call__(layer, q, k, v, sliding_window)


class Dense(DenseLayers):
    def decode(self, layer, q, keys, values):
        return self.dense(q, keys, values)


# --- gemfilter --------------------------------------------------------------------------------

def test_gemfilter_sums_raw_products_over_every_query_head():
    # two kv-heads, one query head each. Head 0 gives tokens 0 and 1 products 20 and 19.9, head 1
    # gives token 1 0.1 over 0: summed, token 1 leads (20.0 vs 20.1); summed softmax probabilities
    # would pick token 0 (0.77 vs 0.74), a max over heads token 0 too
    queries = torch.zeros(4, 2, 2)
    queries[-1] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[[20.0, 0.0], [19.9, 0.0], [-30.0, 0.0], [-30.0, 0.0]],
                         [[0.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]]])
    method = make_method("gemfilter", budget=1, kernel_size=1)
    assert picked(method.refill(view(queries, keys))) == [1]
    probs = torch.einsum("hd,hsd->hs", queries[-1], keys).softmax(-1).sum(0)
    assert int(probs.argmax()) == 0  # the softmax sum, which gemfilter does not take, differs


def test_gemfilter_groups_query_heads_over_their_kv_head():
    # one kv-head, two query heads: token 2 is 5 for one, -4 for the other (sum 1); token 0 is 1
    # and 1 (sum 2); only the last query counts (an earlier one loves token 3)
    queries = torch.zeros(5, 2, 2)
    queries[-1] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queries[0] = torch.tensor([[0.0, 50.0], [0.0, 50.0]])
    keys = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [5.0, -4.0], [-1.0, 3.0], [-2.0, -2.0]]])
    method = make_method("gemfilter", budget=1, kernel_size=1)
    assert picked(method.refill(view(queries, keys))) == [0]
    assert picked(make_method("gemfilter", budget=2, kernel_size=1).refill(view(queries, keys))) == [0, 3]


def test_gemfilter_pools_neighbours_with_zero_padding():
    # products 0 0 6 0 0 0 4 4 4 0: unpooled token 2 wins; averaged over 5 (zeros counted),
    # token 7 (12 / 5) beats token 2 (6 / 5); at the edge token 9 gets (4 + 4 + 0 + pad) / 5
    products = torch.tensor([0.0, 0, 6, 0, 0, 0, 4, 4, 4, 0])
    queries = torch.zeros(10, 1, 1)
    queries[-1] = 1.0
    keys = products.view(1, 10, 1)
    assert picked(make_method("gemfilter", budget=1, kernel_size=1).refill(view(queries, keys))) == [2]
    assert picked(make_method("gemfilter", budget=1).refill(view(queries, keys))) == [7]
    assert torch.allclose(make_method("gemfilter", budget=1).scores(view(queries, keys))[[2, 7, 9]],
                          torch.tensor([6 / 5, 12 / 5, 8 / 5]))


def test_gemfilter_keeps_the_budget_or_the_share_and_nothing_forced():
    keys = torch.arange(10.0).view(1, 10, 1).flip(1)  # products fall along the prompt: the last token scores least
    queries = torch.ones(10, 1, 1)
    assert picked(make_method("gemfilter", budget=3, kernel_size=1).refill(view(queries, keys))) == [0, 1, 2]
    assert picked(make_method("gemfilter", compression=0.6, kernel_size=1).refill(view(queries, keys))) == [0, 1, 2, 3]
    assert picked(make_method("gemfilter", budget=50).refill(view(queries, keys))) == list(range(10))


def test_gemfilter_plans_memory_for_the_filter_pass():
    method = make_method("gemfilter", budget=10, filter_layer=1)
    assert [method.kept_after_prefill(100, layer, 4) for layer in range(4)] == [100, 100, 10, 10]
    method.cache_request(32, 64)
    assert method.refill_layer == 1
    default = make_method("gemfilter", budget=10)
    default.cache_request(32, 64)
    assert default.refill_layer == 13  # the official layer 13 of Llama-3.1-8B's 32
    default.cache_request(40, 64)
    assert default.refill_layer == 16  # round(13 * 40 / 32)
    assert [default.kept_after_prefill(100, layer, 40) for layer in (16, 17)] == [100, 10]


def restated_gemfilter(model, prompt, layer, k, kernel=5):
    """GemFilter's selection stated plainly: the prompt through the dense model, layer `layer`'s
    last query against every key, q . k summed over the query heads (each over its kv-head),
    averaged over `kernel` neighbours (zeros past the ends), top k, in prompt order."""
    capture = Capture()
    capture.positions = torch.arange(len(prompt))
    with torch.inference_mode():
        model(torch.tensor(prompt), capture.positions, capture)
    q, keys = capture.q[layer][-1].float(), capture.k[layer].float()  # [Hq, D], [T, H, D]
    group = q.shape[0] // keys.shape[1]
    raw = sum((keys[:, h // group] * q[h]).sum(-1) for h in range(q.shape[0]))
    half = kernel // 2
    padded = torch.cat([torch.zeros(half), raw, torch.zeros(half)])
    pooled = torch.stack([padded[i:i + kernel].sum() / kernel for i in range(len(prompt))])
    chosen = sorted(pooled.topk(min(k, len(prompt))).indices.tolist())
    return [prompt[i] for i in chosen]


@pytest.mark.parametrize("filter_layer", [0, 1])
def test_gemfilter_generates_what_a_plain_rerun_on_its_picks_does(make, filter_layer):
    llm = make("gemfilter", budget=24, filter_layer=filter_layer)
    got = greedy(llm)
    for prompt, tokens in zip(PROMPTS, got):
        picks = restated_gemfilter(llm.model, prompt, filter_layer, 24)
        assert len(picks) == 24
        assert tokens == restated_greedy(llm.model, Dense(), picks, STEPS)
    assert got != greedy(make(), PROMPTS)


def test_gemfilter_default_layer_and_compression(make):
    llm = make("gemfilter", compression=0.7)  # 2 layers: round(13 * 2 / 32) = 1
    assert llm.method.refill_layer == 1
    got = greedy(llm, PROMPTS[1:])
    for prompt, tokens in zip(PROMPTS[1:], got):
        picks = restated_gemfilter(llm.model, prompt, 1, math.ceil(0.3 * len(prompt)))
        assert tokens == restated_greedy(llm.model, Dense(), picks, STEPS)


def test_gemfilter_question_follows_the_refilled_context(make):
    context, question = PROMPTS[2][:100], PROMPTS[2][100:]
    llm = make("gemfilter", budget=30, filter_layer=0)
    [got] = greedy(llm, [(context, question)])
    picks = restated_gemfilter(llm.model, context, 0, 30)  # the question is not in the filter pass
    assert got == restated_greedy(llm.model, Dense(), picks + question, STEPS)


def test_gemfilter_with_a_budget_over_the_prompt_is_full(make):
    assert greedy(make("gemfilter", budget=500, filter_layer=0)) == greedy(make())


def test_gemfilter_every_layer_holds_its_picks_at_new_positions(make):
    llm = make("gemfilter", budget=24, filter_layer=0)
    _, held = generate_holding(llm, PROMPTS[2], 1)
    assert held == [list(range(24))] * 4  # 2 layers x 2 kv-heads, positions 0 .. 23
    full = make()
    greedy(full, PROMPTS[2:], 1)
    greedy(llm, PROMPTS[2:], 1)
    assert llm.stats["peak_kv_bytes"] < full.stats["peak_kv_bytes"]


def test_gemfilter_preempts_and_recomputes(make):
    from nanokv import SamplingParams

    prompts = [list(range(10 + i, 50 + i)) for i in range(6)]
    assert_preemption_repeats(lambda **kw: make("gemfilter", budget=16, filter_layer=0, **kw), prompts,
                              SamplingParams(max_tokens=30, ignore_eos=True), blocks=20)


def test_gemfilter_refuses_bad_options(make):
    with pytest.raises(ValueError, match="filter_layer=-2"):
        make_method("gemfilter", budget=8, filter_layer=-2)
    with pytest.raises(ValueError, match="kernel_size=4"):
        make_method("gemfilter", budget=8, kernel_size=4)
    with pytest.raises(ValueError, match=r"filter_layer=5 .* 0 \.\. 1 for this 2-layer model"):
        make("gemfilter", budget=8, filter_layer=5)


# --- fastkv -----------------------------------------------------------------------------------

def window_view(T=20, H=2, group=1, D=4, layer=0, state=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return view(torch.randn(T, H * group, D, generator=gen), torch.randn(H, T, D, generator=gen), layer, 2, state)


def test_fastkv_keeps_snapkvs_picks_with_its_own_window():
    # keep_mask is SnapKV's over the same window, kernel and pooling (FastKV's cluster is SnapKV's)
    v = window_view(T=40, group=2)
    method = make_method("fastkv", budget=16)
    snap = make_method("snapkv", budget=16, window_size=8, kernel_size=7, pooling="max")
    keep = method.keep_mask(v)
    assert torch.equal(keep, snap.keep_mask(v))
    assert keep.sum(-1).tolist() == [16, 16] and keep[:, -8:].all()


def test_fastkv_propagates_the_window_and_the_top_over_all_heads():
    # window 2, no pooling: head 0 puts its window's attention on token 1, head 1 on token 3
    # (strongly) and on token 1 a little; summed over heads token 1 leads, then 3
    T, D = 8, 2
    queries, keys = torch.zeros(T, 2, D), torch.zeros(2, T, D)
    queries[-2:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys[0, 1] = torch.tensor([6.0, 0.0])
    keys[1, 3], keys[1, 1] = torch.tensor([0.0, 7.0]), torch.tensor([0.0, 4.0])
    method = make_method("fastkv", budget=3, window_size=2, kernel_size=1, tsp_layer=0, tsp_len=3)
    assert picked(method.propagate(view(queries, keys))) == [1, 6, 7]
    method.tsp_len = 4
    assert picked(method.propagate(view(queries, keys))) == [1, 3, 6, 7]
    assert picked(method.keep_mask(view(queries, keys))[0]) == [1, 6, 7]  # per head: head 0's own top
    assert picked(method.keep_mask(view(queries, keys))[1]) == [3, 6, 7]


def test_fastkv_propagates_only_at_its_layer_and_past_the_budget_and_tsp():
    v = window_view(T=40)
    assert make_method("fastkv", budget=16, tsp_layer=1, tsp_len=20).propagate(v) is None  # layer 0
    assert make_method("fastkv", budget=16, tsp_layer=0, tsp_len=40).propagate(v) is None  # 40 not > 40
    assert make_method("fastkv", budget=41, tsp_layer=0, tsp_len=20).propagate(v) is None  # within budget
    assert int(make_method("fastkv", budget=16, tsp_layer=0, tsp_len=20).propagate(v).sum()) == 20
    assert int(make_method("fastkv", compression=0.5, tsp_layer=0, tsp_rate=0.3).propagate(v).sum()) == 12
    assert make_method("fastkv", budget=16).propagate(v) is None  # default layer: 1 of 2


def test_fastkv_later_layers_budget_from_the_whole_prompt():
    state = {}
    method = make_method("fastkv", compression=0.5, tsp_layer=0, tsp_rate=0.25)
    assert int(method.keep_mask(window_view(T=80, state=state)).sum(-1)[0]) == 40
    # layer 1 holds the 20 propagated tokens: 50% of the 80-token prompt covers them
    assert method.keep_mask(window_view(T=20, layer=1, state=state)) is None
    budget = make_method("fastkv", budget=12, tsp_layer=0, tsp_len=20)
    state = {}
    budget.keep_mask(window_view(T=80, state=state))
    assert budget.keep_mask(window_view(T=20, layer=1, state=state)).sum(-1).tolist() == [12, 12]


class PlainFastKV:
    """FastKV stated plainly as the model's attention callable: each prompt layer attends densely
    over the tokens it gets, then each kv-head keeps the top (k - W) of its window scores (the
    last W queries' softmax over the keys, causal, summed over them, averaged over neighbours per query head,
    summed over its group) plus the window; after `tsp` layer only the tokens whose scores summed
    over every head are the top (tsp - W), and the window, go on. Decode attends over what each
    head kept."""

    def __init__(self, k, tsp, tsp_layer, kernel=7, window=8):
        self.k, self.tsp, self.tsp_layer, self.window, self.kernel = k, tsp, tsp_layer, window, kernel
        self.held, self.prompt_len, self.tsp_scores = {}, None, None

    def window_scores(self, q, k):
        """[H, S - W] of the prompt's queries q [S, Hq, D] over its keys k [S, H, D]."""
        S, Hq, D = q.shape
        H, W = k.shape[1], min(self.window, S)
        rows = []
        for h in range(Hq):
            logits = q[S - W:, h].float() @ k[:, h // (Hq // H)].float().T / math.sqrt(D)  # [W, S]
            future = torch.arange(S)[None, :] > torch.arange(S - W, S)[:, None]
            rows.append(logits.masked_fill(future, float("-inf")).softmax(-1).sum(0)[:S - W])
        # average over `kernel` neighbours, zeros past the ends counted (avg_pool1d's padding)
        padded = F.pad(torch.stack(rows), (self.kernel // 2, self.kernel // 2))
        pooled = padded.unfold(1, self.kernel, 1).sum(-1) / self.kernel
        return pooled.view(H, Hq // H, S - W).sum(1)

    def __call__(self, layer, q, k, v, sliding_window):
        if len(q) == 1:  # decode: each head over what it kept and the new token
            outs = []
            group = q.shape[1] // k.shape[1]
            for h, (keys, values, pos) in enumerate(self.held[layer]):
                keys, values = torch.cat([keys, k[:, h]]), torch.cat([values, v[:, h]])
                pos = torch.cat([pos, self.positions])
                self.held[layer][h] = (keys, values, pos)
                outs.append(attention_by_position(q[:, h * group:(h + 1) * group], keys[:, None], values[:, None],
                                                  self.positions, pos))
            return torch.cat(outs, dim=1)
        out = attention_by_position(q, k, v, self.positions, self.positions)
        S, W = len(q), min(self.window, len(q))
        self.prompt_len = self.prompt_len or S
        keep = min(S, self.k)
        scores = self.window_scores(q, k)
        window = torch.arange(S - W, S)
        self.held[layer] = []
        for h in range(k.shape[1]):
            chosen = torch.arange(S) if keep >= S else \
                torch.cat([scores[h].topk(keep - W).indices, window]).sort().values
            self.held[layer].append((k[chosen, h], v[chosen, h], self.positions[chosen]))
        if layer == self.tsp_layer and self.prompt_len > self.tsp and self.prompt_len >= self.k:
            self.tsp_scores = torch.cat([scores.sum(0).topk(self.tsp - W).indices, window]).sort().values
        return out

    def narrow(self, layer):
        if layer != self.tsp_layer or self.tsp_scores is None:
            return None
        rows, self.tsp_scores = self.tsp_scores, None
        self.positions = self.positions[rows]
        return rows


@pytest.mark.parametrize("options, k, tsp", [
    (dict(budget=20, tsp_layer=0, tsp_len=40, kernel_size=1), lambda n: 20, lambda n: 40),
    (dict(compression=0.6, tsp_layer=0, tsp_rate=0.5, pooling="avg"),
     lambda n: math.ceil(0.4 * n), lambda n: math.ceil(0.5 * n)),
    (dict(budget=30, tsp_layer=0, tsp_len=24, kernel_size=3, pooling="avg"), lambda n: 30, lambda n: 24),
])
def test_fastkv_generates_what_a_plain_restatement_does(make, options, k, tsp):
    # no max pooling here: its plateaus tie neighbours exactly, and either may win a tie (the
    # hand-built test above checks max pooling against snapkv's)
    llm = make("fastkv", **options)
    got = greedy(llm)
    for prompt, tokens in zip(PROMPTS, got):
        n = len(prompt)
        plain = PlainFastKV(k(n), tsp(n), 0, options.get("kernel_size", 7))
        assert tokens == restated_greedy(llm.model, plain, prompt, STEPS)
    assert got != greedy(make(), PROMPTS)


def test_fastkv_with_a_budget_over_the_prompt_is_full(make):
    assert greedy(make("fastkv", budget=500, tsp_layer=0, tsp_len=10)) == greedy(make())


def test_fastkv_later_layers_hold_only_propagated_tokens(make):
    # 120 tokens, budget 60, 30 go on past layer 0: layer 0 keeps 60 per head, layer 1 all 30 it got,
    # the same 30 in both heads, the last 8 among them
    llm = make("fastkv", budget=60, tsp_layer=0, tsp_len=30)
    _, held = generate_holding(llm, PROMPTS[2], 1)
    assert [len(h) for h in held] == [60, 60, 30, 30]
    assert held[2] == held[3] and held[2][-8:] == list(range(112, 120))
    full = make()
    greedy(full, PROMPTS[2:], 1)
    greedy(llm, PROMPTS[2:], 1)
    assert llm.stats["peak_kv_bytes"] < full.stats["peak_kv_bytes"]


def test_fastkv_preempts_and_recomputes(make):
    from nanokv import SamplingParams

    prompts = [list(range(10 + i, 50 + i)) for i in range(6)]
    assert_preemption_repeats(lambda **kw: make("fastkv", budget=16, tsp_layer=0, tsp_len=24, **kw), prompts,
                              SamplingParams(max_tokens=30, ignore_eos=True), blocks=20)


def test_fastkv_refuses_bad_options(make):
    for bad, match in [(dict(tsp_rate=0.0), "tsp_rate=0.0"), (dict(tsp_rate=1.5), "tsp_rate=1.5"),
                       (dict(tsp_len=0), "tsp_len=0"), (dict(tsp_layer=-3), "tsp_layer=-3"),
                       (dict(pooling="median"), "pooling='median'")]:
        with pytest.raises(ValueError, match=match):
            make_method("fastkv", budget=16, **bad)
    with pytest.raises(ValueError, match="budget=8 must exceed window_size=8"):
        make_method("fastkv", budget=8)
    with pytest.raises(ValueError, match=r"tsp_layer=2 .* 0 \.\. 1 for this 2-layer model"):
        make("fastkv", budget=16, tsp_layer=2)


def test_fastkv_question_passes_every_layer_whole(make):
    # a 100-token context (budget 60, 30 go on) then a 20-token question: each layer keeps its share
    # of the context and the whole question after it
    llm = make("fastkv", budget=60, tsp_layer=0, tsp_len=30)
    context, question = PROMPTS[2][:100], PROMPTS[2][100:]
    _, held = generate_holding(llm, (context, question), 1)
    assert [len(h) for h in held] == [80, 80, 50, 50]
    assert all(h[-20:] == list(range(100, 120)) for h in held)
    assert held[2][:30][-8:] == list(range(92, 100))  # the context's window went on
