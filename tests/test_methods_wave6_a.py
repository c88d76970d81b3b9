"""TidalDecode and Recycled Attention (issue 29): query-aware readers that pick single tokens.
Their picks by hand through a ReadStep, their options, a plain restatement of each run as the
model's attention against the engine under continuous batching, and the engine with a budget
that covers the context (full's tokens) or less (fewer bytes read)."""

import math

import pytest
import torch

from helpers import DenseLayers, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import ReadStep
from test_methods_decode_wave2 import serve

INF = float("-inf")


def read_step(layer, queries, keys, lengths, states=None, step_state=None, num_layers=5, block_size=4):
    """A ReadStep over hand-built queries [b, Hq, D] and keys [b, H, S, D]."""
    b, H, S, _ = keys.shape
    return ReadStep(layer, num_layers, queries, torch.tensor([S] * b), torch.tensor(lengths), block_size, 4,
                    states if states is not None else [{} for _ in range(b)],
                    step_state if step_state is not None else {}, keys=keys,
                    key_positions=torch.arange(S).expand(b, H, S))


def picked(slots):
    """Each (sequence, head)'s picked slots as a sorted list."""
    return [[sorted(s for s in row.tolist() if s >= 0) for row in seq] for seq in slots]


# --- TidalDecode by hand -------------------------------------------------------------------

def two_head_case():
    """One kv-head, two query heads: head A attends to slot 3, head B to slot 5, both a little to
    slot 1 (the first head alone would pick 3 and 1)."""
    keys = torch.zeros(1, 1, 8, 4)
    keys[0, 0, 3, 0], keys[0, 0, 5, 1] = 3.0, 3.0
    keys[0, 0, 1, :2] = 2.0
    queries = torch.zeros(1, 2, 4)
    queries[0, 0, 0], queries[0, 1, 1] = 10.0, 10.0
    return queries, keys


def test_tidaldecode_selection_layer_reads_every_page_and_keeps_any_heads_top_tokens():
    queries, keys = two_head_case()
    method = make_method("tidaldecode", budget=2)
    step = read_step(2, queries, keys, [[8]])
    picks = method.pick(step)
    assert picks.slots is None and picks.pages.tolist() == [[[0, 1]]]   # full attention here
    assert picked(step.step_state["slots"]) == [[[3, 5]]]
    assert picks.scored_bytes == 0   # the scores come from this layer's own attention pass


def test_tidaldecode_later_layers_reuse_the_selection_and_the_correction_layer_reselects():
    queries, keys = two_head_case()
    method = make_method("tidaldecode", budget=2, correction_layer=3)
    shared = {}
    method.pick(read_step(2, queries, keys, [[8]], step_state=shared))
    other = torch.zeros_like(keys)
    other[0, 0, 6, 0] = other[0, 0, 7, 1] = 5.0   # what layer 3 attends to
    reused = method.pick(read_step(4, queries, other, [[8]], step_state=shared))
    assert reused.pages is None and picked(reused.slots) == [[[3, 5]]]
    corrected = method.pick(read_step(3, queries, other, [[8]], step_state=shared))
    assert corrected.pages.tolist() == [[[0, 1]]]
    assert picked(method.pick(read_step(4, queries, keys, [[8]], step_state=shared)).slots) == [[[6, 7]]]


def test_tidaldecode_pages_past_a_heads_length_are_not_read():
    keys = torch.randn(2, 2, 8, 4)
    picks = make_method("tidaldecode", budget=3).pick(read_step(2, torch.randn(2, 4, 4), keys, [[8, 8], [3, 3]]))
    assert picks.pages.tolist() == [[[0, 1], [0, 1]], [[0, -1], [0, -1]]]


def test_tidaldecode_correction_layer_scales_with_depth():
    method = make_method("tidaldecode")
    assert method.budget == 256
    assert [method.correction(n) for n in (32, 30, 24, 64, 5)] == [13, 12, 10, 26, None]
    assert make_method("tidaldecode", correction_layer=3).correction(5) == 3
    with pytest.raises(ValueError, match=r"correction_layer=7 .* in 3 \.\. 4"):
        make_method("tidaldecode", correction_layer=7).correction(5)


@pytest.mark.parametrize("options, message", [
    ({"correction_layer": 2}, r"correction_layer=2 .* after the selection layer skip_layers=2"),
    ({"correction_layer": -2}, r"correction_layer=-2 .* must be an integer after skip_layers, or -1"),
    ({"skip_layers": -1}, r"skip_layers=-1 .* must be an integer >= 0"),
    ({"compression": 0.5}, r"give --budget .* not --compression=0.5"),
])
def test_tidaldecode_bad_options_name_the_value_and_the_valid_range(options, message):
    with pytest.raises(ValueError, match=message):
        make_method("tidaldecode", **options)


# --- Recycled Attention by hand -------------------------------------------------------------

def peaked_case(b=1):
    """One kv-head, two query heads, 3 pages of 4 slots: head A attends to slots 3 then 1, head B
    to slot 5 (a little more than A to 3: A's 1 takes some of A's attention)."""
    keys = torch.zeros(b, 1, 12, 4)
    keys[:, 0, 3, 0], keys[:, 0, 1, 0], keys[:, 0, 5, 1] = 3.0, 2.0, 3.0
    queries = torch.zeros(b, 2, 4)
    queries[:, 0, 0], queries[:, 1, 1] = 10.0, 10.0
    return queries, keys


def test_recycled_first_step_is_full_and_ranks_by_the_groups_most_attentive_head():
    queries, keys = peaked_case()
    method = make_method("recycled_attention", budget=3, kernel_size=1)
    states = [{}]
    picks = method.pick(read_step(2, queries, keys, [[8]], states))
    assert picks.pages.tolist() == [[[0, 1, -1]]] and picks.scored_bytes == 0
    assert states[0][2]["ranked"].tolist() == [[5, 3, 1]]
    assert states[0][2]["held"].tolist() == [8]


def test_recycled_partial_steps_read_every_new_token_then_the_best_recycled():
    queries, keys = peaked_case()
    method = make_method("recycled_attention", budget=3, kernel_size=1, stride=3)
    states = [{}]
    method.pick(read_step(2, queries, keys, [[8]], states))
    first = method.pick(read_step(2, queries, keys, [[9]], states))
    assert picked(first.slots) == [[[3, 5, 8]]] and first.scored_bytes == 0
    second = method.pick(read_step(2, queries, keys, [[10]], states))
    assert picked(second.slots) == [[[5, 8, 9]]]   # a new token in, the lowest-ranked out
    assert method.pick(read_step(2, queries, keys, [[10]], states)).pages is not None   # stride 3: full again


def test_recycled_max_pooling_spreads_a_peak_to_its_neighbours():
    queries, keys = peaked_case()
    keys[:, 0, 1] = keys[:, 0, 5] = 0.0   # head A: slot 3; head B: 1/8 on every slot
    states = [{}]
    make_method("recycled_attention", budget=4, kernel_size=3).pick(read_step(2, queries, keys, [[8]], states))
    assert states[0][2]["ranked"].tolist() == [[2, 3, 4, 0]]   # then the others tie at 1/8: the older first


def test_recycled_a_batch_mixes_full_and_partial_steps():
    queries, keys = peaked_case(b=2)
    method = make_method("recycled_attention", budget=2, kernel_size=1)
    states = [{}, {}]
    method.pick(read_step(2, queries[:1], keys[:1], [[8]], states[:1]))   # the first sequence started earlier
    picks = method.pick(read_step(2, queries, keys, [[9], [7]], states))
    assert picked(picks.slots) == [[[5, 8]], [list(range(7))]]


def test_recycled_query_schedule_attends_fully_only_when_the_query_moved():
    queries, keys = peaked_case()
    method = make_method("recycled_attention", budget=2, kernel_size=1, stride=2, schedule="query", threshold=0.9)
    states = [{}]
    method.pick(read_step(2, queries, keys, [[8]], states))
    method.pick(read_step(2, queries, keys, [[9]], states))
    same = method.pick(read_step(2, queries, keys, [[10]], states))   # a check: the same query
    assert picked(same.slots) == [[[8, 9]]]
    moved = torch.zeros_like(queries)
    moved[0, :, 2] = 1.0
    for length in (11, 12):   # 11: between checks; 12: a check, and the query is orthogonal
        picks = method.pick(read_step(2, moved, keys, [[length]], states))
    assert picked(picks.slots) == [[list(range(12))]]
    assert states[0][2]["held"].tolist() == [12]


@pytest.mark.parametrize("option, value, message", [
    ("stride", 0, r"stride=0 .* must be an integer >= 1"),
    ("kernel_size", 4, r"kernel_size=4 .* must be an odd integer >= 1"),
    ("schedule", "sometimes", r"schedule='sometimes' .* must be one of fixed, query"),
    ("threshold", 0.0, r"threshold=0.0 .* must be a number in \(0, 1\]"),
])
def test_recycled_bad_options_name_the_value_and_the_valid_range(option, value, message):
    with pytest.raises(ValueError, match=message):
        make_method("recycled_attention", **{option: value})


def test_recycled_takes_a_budget_not_a_compression():
    assert make_method("recycled_attention").budget == 2048
    with pytest.raises(ValueError, match=r"give --budget .* not --compression=0.5"):
        make_method("recycled_attention", compression=0.5)


# --- plain restatements against the engine ---------------------------------------------------

def group_probs(q, keys):
    """[H, n]: each key's highest attention probability over its kv-head's query heads."""
    H = keys.shape[1]
    qg = q[0].float().view(H, -1, q.shape[-1])
    logits = torch.einsum("hgd,nhd->hgn", qg, keys.float()) / math.sqrt(q.shape[-1])
    return logits.softmax(dim=-1).amax(dim=1)


class DenseTidal(DenseLayers):
    """TidalDecode stated plainly: layers before `skip` dense; `skip` and `correction` attend to
    everything and keep each kv-head's `budget` most attended positions (max over its query
    heads); the layers in between and after attend to the kept positions only."""

    def __init__(self, budget, skip, correction):
        super().__init__()
        self.budget, self.skip, self.correction = budget, skip, correction

    def decode(self, layer, q, keys, values):
        n = len(keys)
        everything = [torch.arange(n)] * keys.shape[1]
        if layer < self.skip:
            return self.attend(q, keys, values, everything)
        if layer in (self.skip, self.correction):
            probs = group_probs(q, keys)
            self.kept = [torch.tensor(sorted(row.topk(min(self.budget, n)).indices.tolist())) for row in probs]
            return self.attend(q, keys, values, everything)
        return self.attend(q, keys, values, self.kept)


class DenseRecycled(DenseLayers):
    """Recycled Attention stated plainly, per layer: every `stride` decode steps attend to
    everything and rank the positions (max over the query heads, max-pooled over `kernel`
    neighbours, the older first on a tie); in between attend to the positions since that step
    (newest first) and the best-ranked, `budget` in all."""

    def __init__(self, budget, stride, kernel):
        super().__init__()
        self.budget, self.stride, self.kernel, self.state = budget, stride, kernel, {}

    def decode(self, layer, q, keys, values):
        n, r = len(keys), self.kernel // 2
        count, ranked, since = self.state.get(layer, (0, None, 0))
        if count % self.stride == 0:
            probs = group_probs(q, keys)
            pooled = [[max(row[max(0, s - r):s + r + 1].tolist()) for s in range(n)] for row in probs]
            ranked = [sorted(range(n), key=lambda s: (-p[s], s))[:self.budget] for p in pooled]
            self.state[layer] = (count + 1, ranked, n)
            return self.attend(q, keys, values, [torch.arange(n)] * keys.shape[1])
        self.state[layer] = (count + 1, ranked, since)
        new = list(range(n - 1, since - 1, -1))[:self.budget]
        chosen = [torch.tensor(sorted(new + row[:self.budget - len(new)])) for row in ranked]
        return self.attend(q, keys, values, chosen)


PROMPTS = [[(i * 41 + j * 13) % 256 for j in range(n)] for i, n in enumerate((30, 17, 41, 24))]


@pytest.mark.parametrize("name, options, dense", [
    ("tidaldecode", {"correction_layer": 3}, lambda: DenseTidal(8, 2, 3)),
    ("tidaldecode", {}, lambda: DenseTidal(8, 2, None)),   # 5 layers: round(13 * 5 / 32) = 2, no correction
    ("recycled_attention", {"stride": 4}, lambda: DenseRecycled(8, 4, 7)),
    ("recycled_attention", {"stride": 3, "kernel_size": 1}, lambda: DenseRecycled(8, 3, 1)),
])
def test_engine_matches_a_plain_statement_under_continuous_batching(tiny_deep, name, options, dense):
    steps = 12
    method = make_method(name, budget=8, **options)
    outs, _, preempted, _ = serve(tiny_deep, method, PROMPTS, 1000, steps)
    assert preempted == 0   # a recompute would start the readers' state afresh
    model, _ = tiny_deep
    for prompt, out in zip(PROMPTS, outs):
        assert out == restated_greedy(model, dense(), prompt, steps)


@pytest.fixture(scope="module")
def tiny_llama6(tmp_path_factory):
    from tiny_model import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-6"), 6)


@pytest.mark.parametrize("name", ["tidaldecode", "recycled_attention"])
def test_a_budget_covering_the_context_is_full_and_reads_fall_with_the_budget(tiny_llama6, name):
    from nanokv import LLM, SamplingParams

    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [list(range(10, 10 + n)) for n in (40, 75, 100)]
    full = LLM(str(tiny_llama6), dtype="float32")
    expected = [o.token_ids for o in full.generate(prompts, params)]
    read = {}
    for budget in (4096, 32, 8):
        llm = LLM(str(tiny_llama6), dtype="float32", method=name, budget=budget)
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        read[budget] = llm.stats["kv_bytes_read_per_decode_token"]
        if budget == 4096:
            assert outs == expected
    assert full.stats["kv_bytes_read_per_decode_token"] >= read[4096] > read[32] > read[8]
