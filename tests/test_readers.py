"""The reader role's engine path (methods/base.py: PageReader.pick), with readers made up here: picks
of single slots are gathered into blocks of their own and attended (cache.attend_slots), picks of
pages through a reduced table (cache.pick_pages); picks that cover the cache give full's tokens
exactly; exact top-k slots give what a plain restatement gives; the bytes read fall with the
picks; a sequence's state lives from step to step and a step's from layer to layer; a tight pool
preempts and recomputes without losing a request."""

import pytest
import torch

from helpers import DenseLayers, assert_preemption_repeats, restated_greedy
from nanokv.methods.base import PageReader, Picks, top_slots
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]


class TopSlots(PageReader):
    """Each kv-head's `budget` slots of highest q . k (the most over its query heads)."""
    name, description, paper = "top_slots", "test: exact top-k slots", ""

    def pick(self, step):
        return Picks(slots=top_slots(step.logits().amax(dim=2), self.budget), scored_bytes=step.key_bytes())


class EveryPage(PageReader):
    """Every held page, newest first (the engine puts them back in order)."""
    name, description, paper = "every_page", "test: every page", ""
    reads_bounds = True

    def pick(self, step):
        nb = step.bounds[0].shape[2]
        pages = torch.arange(nb, device=step.lengths.device).expand(*step.lengths.shape, nb)
        return Picks(pages=pages.masked_fill(pages * step.block_size >= step.lengths[..., None], -1).flip(-1))


class Counting(TopSlots):
    """TopSlots that counts, per sequence and layer, the decode steps it has seen (its state), and
    checks that every layer of a step sees the same step dict."""
    name = "counting"
    seen: list = []

    def pick(self, step):
        step.step_state.setdefault("layers", []).append(step.layer)
        assert step.step_state["layers"] == list(range(len(step.step_state["layers"])))
        for state in step.states:
            state[step.layer] = state.get(step.layer, 0) + 1
        Counting.seen.append([state[step.layer] for state in step.states])
        return super().pick(step)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make(tiny_path, monkeypatch):
    from nanokv import LLM
    from nanokv.methods import METHODS

    for reader in (TopSlots, EveryPage, Counting):
        monkeypatch.setitem(METHODS, reader.name, reader)
    return lambda method="full", budget=None, **kw: LLM(str(tiny_path), dtype="float32", method=method,
                                                        budget=budget, **kw)


def greedy(llm, prompts=PROMPTS, steps=16):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def test_picks_covering_the_cache_give_full_exactly(make):
    full = make()
    expected = greedy(full)
    for method in ("top_slots", "every_page"):
        llm = make(method, budget=1000)
        assert greedy(llm) == expected
    # every page, and nothing scored: exactly full's bytes
    assert llm.stats["kv_bytes_read_per_decode_token"] == full.stats["kv_bytes_read_per_decode_token"]


class DenseTopSlots(DenseLayers):
    """TopSlots stated plainly: each kv-head attends over its `k` keys of highest q . k (the most
    over its query heads) at every decode step."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def decode(self, layer, q, keys, values):
        n, H = keys.shape[:2]
        group = q.shape[1] // H
        logits = [q[0, h * group:(h + 1) * group].float() @ keys[:, h].float().T for h in range(H)]  # [group, n]
        return self.attend(q, keys, values, [lg.amax(0).topk(min(self.k, n)).indices.sort().values for lg in logits])


@pytest.mark.parametrize("budget", [5, 24])  # fewer than a block, and a block and a half
def test_single_slots_are_read_as_a_plain_top_k_reads_them(make, budget):
    llm = make("top_slots", budget=budget)
    [got] = greedy(llm, PROMPTS[1:2], 12)
    assert got == restated_greedy(llm.model, DenseTopSlots(budget), PROMPTS[1], 12)


def test_bytes_read_are_the_keys_scored_and_the_slots_picked(make):
    llm = make("top_slots", budget=8)
    greedy(llm, PROMPTS[:1], 5)
    # 4 decode steps holding 41 .. 44 tokens, 2 layers of 1 kv-head of 64 float32 numbers: every key
    # scored (K alone), then 8 slots' K, V and int32 position
    per_step = [2 * (n * 64 * 4 + 8 * (2 * 64 * 4 + 4)) for n in (41, 42, 43, 44)]
    assert llm.stats["kv_bytes_read_per_decode_token"] == sum(per_step) / 4
    full = make()
    greedy(full, PROMPTS[:1], 5)
    assert full.stats["kv_bytes_read_per_decode_token"] == 2 * 3 * 16 * (2 * 64 * 4 + 4)  # 3 whole blocks


def test_a_sequences_state_lives_from_step_to_step_and_a_steps_from_layer_to_layer(make):
    Counting.seen = []
    llm = make("counting", budget=8)
    greedy(llm, PROMPTS[:2], 5)
    # 4 decode steps x 2 layers, the two sequences batched: each layer counts 1, 2, 3, 4
    assert Counting.seen == [[1, 1], [1, 1], [2, 2], [2, 2], [3, 3], [3, 3], [4, 4], [4, 4]]
    Counting.seen = []
    greedy(llm, PROMPTS[:1], 3)  # a new request starts afresh; the finished ones' states are gone
    assert Counting.seen == [[1], [1], [2], [2]] and not llm.runner.read_states


def test_a_tight_pool_preempts_and_recomputes_every_request(make):
    from nanokv import SamplingParams

    # a budget covering everything: the recompute (dense, as prefill) gives the same tokens
    assert_preemption_repeats(lambda **kw: make("top_slots", budget=1000, **kw), PROMPTS,
                              SamplingParams(max_tokens=40, ignore_eos=True), blocks=24)


def test_the_cpp_and_plain_kernels_read_the_gathered_slots_alike(make):
    assert greedy(make("top_slots", budget=20, kernels="cpu")) == greedy(make("top_slots", budget=20, kernels="reference"))
