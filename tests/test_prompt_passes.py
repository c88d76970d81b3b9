"""Prompts narrowed between layers (Method.narrows: propagate) and filter passes (Method.refill_layer:
refill), with methods made up here: a narrowing method's later layers compute and hold only the
tokens it propagated, as a plain restatement does; a filter pass's picks are prefilled alone at new
positions and generate what a plain run over them generates; both survive preemption."""

import pytest
import torch

from helpers import DenseLayers, assert_preemption_repeats, restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods.base import PrefillSelector
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]


class EvenOnward(PrefillSelector):
    """Keeps every token; from layer 0 on, only the even positions (and the last) go on."""
    name, description, paper = "even_onward", "test: odd tokens stop after layer 0", ""
    narrows = True

    def keep_mask(self, view):
        return None

    def kept_after_prefill(self, n, layer, num_layers):
        return n

    def propagate(self, view):
        return view.positions % 2 == 0 if view.layer == 0 else None


class EvenRefill(PrefillSelector):
    """A filter pass to layer 0 that keeps the even positions."""
    name, description, paper = "even_refill", "test: refill the even tokens", ""
    refill_layer = 0

    def keep_mask(self, view):
        return None

    def kept_after_prefill(self, n, layer, num_layers):
        return n

    def refill(self, view):
        return view.positions % 2 == 0


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make(tiny_path, monkeypatch):
    from nanokv import LLM
    from nanokv.methods import METHODS

    for method in (EvenOnward, EvenRefill):
        monkeypatch.setitem(METHODS, method.name, method)
    return lambda method="full", **kw: LLM(str(tiny_path), dtype="float32", method=method, **kw)


def greedy(llm, prompts=PROMPTS, steps=12):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


class DenseEvenOnward:
    """EvenOnward stated plainly: after layer 0 of the prompt only its even positions and its last
    token go on (the model asks `narrow`); every layer attends over all it holds."""

    def __init__(self):
        self.layers = {}

    def __call__(self, layer, q, k, v, sliding_window):
        keys, values, pos = self.layers.get(layer, (k[:0], v[:0], self.positions[:0]))
        keys, values, pos = torch.cat([keys, k]), torch.cat([values, v]), torch.cat([pos, self.positions])
        self.layers[layer] = (keys, values, pos)
        return attention_by_position(q, keys, values, self.positions, pos)

    def narrow(self, layer):
        if layer != 0 or len(self.positions) == 1:
            return None
        keep = self.positions % 2 == 0
        keep[-1] = True
        self.positions = self.positions[keep]
        return keep.nonzero().flatten()


def test_narrowed_layers_hold_and_compute_only_what_went_on(make):
    llm = make("even_onward", compression=0.5)
    [got] = greedy(llm, PROMPTS[1:2], 10)
    assert got == restated_greedy(llm.model, DenseEvenOnward(), PROMPTS[1], 10)
    assert got != greedy(make(), PROMPTS[1:2], 10)[0]
    # after the prompt: layer 0 held all 75, layer 1 the 38 even positions (the last, 84, is even)
    greedy(llm, PROMPTS[1:2], 1)
    assert llm.stats["peak_kv_bytes"] == (5 + 3) * llm.cache.pool.bytes_per_block


class Dense(DenseLayers):
    def decode(self, layer, q, keys, values):
        return self.dense(q, keys, values)


def test_a_filter_pass_prefills_its_picks_alone_at_new_positions(make):
    llm = make("even_refill", compression=0.5)
    got = greedy(llm)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == restated_greedy(llm.model, Dense(), prompt[::2], 12)
    assert int(llm.cache.pool.num_used) == 0


@pytest.mark.parametrize("method, prompts, blocks", [
    ("even_onward", PROMPTS, 18),
    ("even_refill", [list(range(10 + i, 40 + i)) for i in range(6)], 12),  # a recompute filters again
])
def test_a_tight_pool_preempts_and_recomputes_every_request(make, method, prompts, blocks):
    from nanokv import SamplingParams

    assert_preemption_repeats(lambda **kw: make(method, compression=0.5, **kw), prompts,
                              SamplingParams(max_tokens=30, ignore_eos=True), blocks=blocks)
