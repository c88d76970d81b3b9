"""LazyLLM (nanokv/methods/lazyllm.py): on hand-built views, the tokens that go on past a pruning
layer (the last query's attention averaged over the query heads, the last token always), the
pruning layers and the stage schedule; option errors; and in the engine under continuous
batching: a plain restatement's tokens (later layers compute and hold only what went on),
`full`'s where the budget covers the prompt, the KV each layer holds, and a preemption's
recompute repeating its tokens."""

import math

import pytest
import torch

from helpers import assert_preemption_repeats, restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]


def lazyllm(**kw):
    return make_method("lazyllm", **kw)


def view_with_last_query_probs(probs, layer=2, num_layers=4, state=None):
    """One kv-head, len(probs) query heads; S cached tokens with one-hot keys (D = S), the last
    query of head h giving token j the probability probs[h][j] (T = S queries, the others 0)."""
    probs = torch.tensor(probs, dtype=torch.float32)
    Hq, S = probs.shape
    keys = torch.eye(S)[None]                                   # [1, S, D=S]
    queries = torch.zeros(S, Hq, S)
    queries[-1] = probs.log() * math.sqrt(S)                    # logit_j = log p_j
    return PrefillView(layer, num_layers, queries, keys, torch.arange(S),
                       sequence_state={} if state is None else state)


def test_the_tokens_that_go_on_are_the_last_querys_top_by_the_mean_over_query_heads():
    # tokens 0 = A, 1 = B, 2 = C, 3 = one nobody attends to, 4 = the last (drawing ~0 too). Head 0
    # gives A 0.45, C 0.55; head 1 gives B 0.6, C 0.4: the mean ranks C (0.475) over B (0.3) over
    # A (0.225); a max over the heads would rank B first
    tiny = 1e-6
    probs = [[0.45, tiny, 0.55, tiny, tiny],
             [tiny, 0.6, 0.4, tiny, tiny]]
    method = lazyllm(budget=2, stages=1)  # 4 layers: one stage, at layer 4 // 2 = 2
    assert method.pruning_layers(4) == [2]
    carried = method.propagate(view_with_last_query_probs(probs))
    assert carried.tolist() == [False, False, True, False, True]   # C and the last
    carried = lazyllm(budget=3, stages=1).propagate(view_with_last_query_probs(probs))
    assert carried.tolist() == [False, True, True, False, True]    # then B
    assert lazyllm(budget=2, stages=1).keep_mask(view_with_last_query_probs(probs)) is None  # no KV is evicted


def test_a_prompt_within_budget_goes_on_whole_and_only_pruning_layers_prune():
    probs = [[0.1, 0.2, 0.3, 0.4]]
    assert lazyllm(budget=4, stages=1).propagate(view_with_last_query_probs(probs)) is None
    method = lazyllm(budget=2, stages=1)
    state = {}
    assert method.propagate(view_with_last_query_probs(probs, layer=0, num_layers=4, state=state)) is None
    assert state["prompt_tokens"] == 4  # layer 0 saw the whole prompt
    assert method.pruning_layers(4) == [2]
    carried = method.propagate(view_with_last_query_probs(probs, layer=2, num_layers=4, state=state))
    assert carried.tolist() == [False, False, True, True]


def test_later_stages_prune_from_the_prompts_length_not_the_layers():
    # 3 stages over 8 layers: layers 2, 4, 6; a 12-token prompt to budget 6 goes on as 10, 8, 6
    method = lazyllm(budget=6, stages=3)
    assert method.pruning_layers(8) == [2, 4, 6]
    assert method.stage_keeps(12, 8) == [10, 8, 6]
    state = {"prompt_tokens": 12}  # what layer 0 recorded
    # at layer 4 only 10 tokens remain; the stage keeps 8 of them: the 7 most attended and the last
    probs = [[float(j + 1) for j in range(10)]]
    probs = [[p / sum(probs[0]) for p in probs[0]]]
    probs[0][0], probs[0][9] = probs[0][9], probs[0][0]         # the last draws least, the first most
    carried = method.propagate(view_with_last_query_probs(probs, layer=4, num_layers=8, state=state))
    assert carried.tolist() == [True, False, False, True, True, True, True, True, True, True]


@pytest.mark.parametrize("stages, num_layers, layers", [
    (3, 32, [8, 16, 24]),       # Llama 2 7B
    (3, 4, [1, 2]),             # 3 * 4 // 4 = 3 is the last layer: pruning there prunes nothing
    (3, 2, [0]),
    (1, 2, []),                 # 2 // 2 = 1 is the last layer: a 2-layer model needs stages >= 3
    (1, 28, [14]),
    (7, 8, [1, 2, 3, 4, 5, 6]),
])
def test_pruning_layers_spread_evenly_before_the_last(stages, num_layers, layers):
    assert lazyllm(compression=0.5, stages=stages).pruning_layers(num_layers) == layers


def test_the_scheduler_plans_each_layers_hold_from_the_stages():
    method = lazyllm(compression=0.6, stages=3)             # 100 tokens -> 40 after the last stage
    assert method.stage_keeps(100, 32) == [80, 60, 40]
    held = [method.kept_after_prefill(100, layer, 32) for layer in range(32)]
    assert held == [100] * 9 + [80] * 8 + [60] * 8 + [40] * 7   # layer 8 still holds all it computed
    assert [lazyllm(budget=200).kept_after_prefill(100, layer, 32) for layer in (0, 31)] == [100, 100]


@pytest.mark.parametrize("options, message", [
    ({"stages": 0}, "stages=0 .* must be an integer >= 1"),
    ({"stages": "two"}, "stages='two' .* must be int"),
    ({"stage": 2}, "unknown option 'stage'"),
])
def test_bad_options_name_the_value_and_the_valid_choices(options, message):
    with pytest.raises(ValueError, match=message):
        lazyllm(compression=0.5, **options)


# --- in the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama4"), num_layers=4)


def make(path, method="full", **kw):
    from nanokv import LLM

    return LLM(str(path), dtype="float32", method=method, **kw)


def greedy(llm, prompts=PROMPTS, steps=10):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


class DenseLazyLLM:
    """LazyLLM stated plainly, as the model's attention callable: every layer attends densely over
    all it holds; after a pruning layer of the prompt (layers `at`, keeping `keeps`) only the
    tokens the last prompt query gave the most softmax attention, averaged over the query heads,
    and the last, go on (the model asks `narrow`)."""

    def __init__(self, at, keeps):
        self.at, self.keeps, self.layers, self.last = at, keeps, {}, {}

    def __call__(self, layer, q, k, v, sliding_window):
        keys, values, pos = self.layers.get(layer, (k[:0], v[:0], self.positions[:0]))
        keys, values, pos = torch.cat([keys, k]), torch.cat([values, v]), torch.cat([pos, self.positions])
        self.layers[layer] = (keys, values, pos)
        if len(q) > 1:  # the prompt: the last query's probabilities over this layer's keys
            group = q.shape[1] // k.shape[1]
            logits = torch.einsum("hd,shd->hs", q[-1].float(), keys.repeat_interleave(group, dim=1).float())
            self.last[layer] = (logits / math.sqrt(q.shape[-1])).softmax(dim=-1).mean(dim=0)
        return attention_by_position(q, keys, values, self.positions, pos)

    def narrow(self, layer):
        if len(self.positions) == 1 or layer not in self.at:
            return None
        keep = self.keeps[self.at.index(layer)]
        if keep >= len(self.positions):
            return None
        scores = self.last[layer].clone()
        scores[-1] = float("inf")
        rows = scores.topk(keep).indices.sort().values
        self.positions = self.positions[rows]
        return rows


@pytest.mark.parametrize("options, at, keeps", [
    # 4 layers, 3 stages: layers 1 and 2 (3 is the last); to ceil(n / 2) in two even steps
    (dict(compression=0.5, stages=3), [1, 2], lambda n: [n - (n - math.ceil(n / 2)) // 2, math.ceil(n / 2)]),
    (dict(budget=30, stages=1), [2], lambda n: [30]),
])
def test_engine_matches_a_plain_statement_under_continuous_batching(tiny4, options, at, keeps):
    llm = make(tiny4, "lazyllm", **options)
    got = greedy(llm)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == restated_greedy(llm.model, DenseLazyLLM(at, keeps(len(prompt))), prompt, 10)
    assert got != greedy(make(tiny4))  # the pruning changes what is generated
    assert int(llm.cache.pool.num_used) == 0


def test_a_gqa_model_prunes_by_the_mean_over_all_query_heads(tiny_gqa_dir):
    # 2 layers, 4 query heads over 2 kv-heads: the default 3 stages prune once, at layer 0
    llm = make(tiny_gqa_dir, "lazyllm", compression=0.6)
    got = greedy(llm)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == restated_greedy(llm.model, DenseLazyLLM([0], [math.ceil(0.4 * len(prompt))]), prompt, 10)


def test_a_budget_covering_the_prompt_is_full(tiny4):
    assert greedy(make(tiny4, "lazyllm", budget=100)) == greedy(make(tiny4))


def test_later_layers_hold_only_what_went_on(tiny4):
    llm, full = make(tiny4, "lazyllm", compression=0.5, stages=3), make(tiny4)
    greedy(llm, PROMPTS[2:], 1)
    greedy(full, PROMPTS[2:], 1)
    # 100 tokens: layers 0-1 hold all, layer 2 the 75 that went on after layer 1, layer 3 the 50
    block = llm.cache.pool.block_size
    blocks = sum(math.ceil(n / block) for n in (100, 100, 75, 50))
    assert llm.stats["peak_kv_bytes"] == blocks * llm.cache.pool.bytes_per_block
    assert full.stats["peak_kv_bytes"] == 4 * math.ceil(100 / block) * full.cache.pool.bytes_per_block


def test_a_tight_pool_preempts_and_recomputes_every_request(tiny4):
    from nanokv import SamplingParams

    assert_preemption_repeats(lambda **kw: make(tiny4, "lazyllm", compression=0.5, **kw), PROMPTS,
                              SamplingParams(max_tokens=30, ignore_eos=True), blocks=40)
