"""Chunked prefill with compression between chunks (methods/base.py: Method.prefill_chunk; the
runner's _chunked_prefill), with methods made up here: a method that keeps everything gives full's
tokens exactly; one that keeps each layer's newest tokens after every chunk gives what a plain
restatement of chunk-by-chunk prefill gives; the view shows what earlier chunks left; scoring
passes follow each chunk; a question after the context runs over the finished cache; a tight pool
preempts and recomputes."""

import pytest
import torch

from helpers import assert_preemption_repeats
from nanokv.kernels.reference import attention_by_position
from nanokv.methods.base import PrefillSelector
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]


class KeepEverything(PrefillSelector):
    name, description, paper = "chunk_keep_all", "test: chunks of 16, nothing dropped", ""
    prefill_chunk = 16
    views: list = []

    def keep_mask(self, view):
        KeepEverything.views.append((view.layer, view.held_before, len(view.queries), view.keys.shape[1]))
        return None

    def kept_after_prefill(self, n, layer, num_layers):
        return n


class KeepNewest(PrefillSelector):
    """After each chunk, each layer keeps its newest `budget` tokens."""
    name, description, paper = "chunk_keep_newest", "test: chunks of 16, the newest budget kept", ""
    prefill_chunk = 16

    def scores(self, view):
        return view.positions.float().expand(view.keys.shape[0], -1)

    def layer_budget(self, n, layer, num_layers):
        return self.budget


class WithPass(KeepEverything):
    """Each chunk followed by a scoring pass of two tokens."""
    name = "chunk_with_pass"
    passes: list = []

    def scoring_passes(self, prompt_ids, encode, reply_prefix):
        return [[1, 2]]

    def keep_mask(self, view):
        WithPass.passes.append((view.scoring_lengths, view.scoring_keys.shape[1], view.keys.shape[1]))
        return None


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make(tiny_path, monkeypatch):
    from nanokv import LLM
    from nanokv.methods import METHODS

    for method in (KeepEverything, KeepNewest, WithPass):
        monkeypatch.setitem(METHODS, method.name, method)
    return lambda method="full", **kw: LLM(str(tiny_path), dtype="float32", method=method, **kw)


def greedy(llm, prompts=PROMPTS, steps=12):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def test_chunks_that_keep_everything_give_full_exactly_and_the_view_shows_the_earlier_chunks(make):
    expected = greedy(make())
    KeepEverything.views = []
    assert greedy(make("chunk_keep_all", compression=0.5), PROMPTS[:1]) == expected[:1]
    # 40 tokens: chunks of 16, 16, 8; each layer's view holds what the earlier chunks left first
    assert [v for v in KeepEverything.views if v[0] == 0] == [(0, 0, 16, 16), (0, 16, 16, 32), (0, 32, 8, 40)]
    assert greedy(make("chunk_keep_all", compression=0.5)) == expected


class ChunkedNewest:
    """KeepNewest stated plainly: the model runs each chunk over what each layer kept of the earlier
    ones, then each layer keeps its newest `budget`; decode attends over everything kept since."""

    def __init__(self, budget):
        self.budget, self.layers, self.decoding = budget, {}, False

    def __call__(self, layer, q, k, v, sliding_window):
        keys, values, pos = self.layers.get(layer, (k[:0], v[:0], self.positions[:0]))
        keys, values, pos = torch.cat([keys, k]), torch.cat([values, v]), torch.cat([pos, self.positions])
        out = attention_by_position(q, keys, values, self.positions, pos)
        if not self.decoding:
            keys, values, pos = keys[-self.budget:], values[-self.budget:], pos[-self.budget:]
        self.layers[layer] = (keys, values, pos)
        return out


@torch.inference_mode()
def chunked_greedy(model, prompt, budget, chunk, steps):
    attention = ChunkedNewest(budget)
    for start in range(0, len(prompt), chunk):
        attention.positions = torch.arange(start, min(len(prompt), start + chunk))
        hidden = model(torch.tensor(prompt[start:start + chunk]), attention.positions, attention)
    attention.decoding, tokens = True, []
    for t in range(steps):
        tokens.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
        attention.positions = torch.tensor([len(prompt) + t])
        hidden = model(torch.tensor(tokens[-1:]), attention.positions, attention)
    return tokens


def test_keeping_the_newest_after_each_chunk_is_read_as_a_plain_restatement(make):
    llm = make("chunk_keep_newest", budget=20)
    [got] = greedy(llm, PROMPTS[2:], 10)
    assert got == chunked_greedy(llm.model, PROMPTS[2], 20, 16, 10)
    assert got != greedy(make(), PROMPTS[2:], 10)[0]  # the chunks' compression changes the answer


def test_scoring_passes_follow_each_chunk_and_leave_nothing(make):
    WithPass.passes = []
    llm = make("chunk_with_pass", compression=0.5)
    greedy(llm, PROMPTS[:1], 4)
    # 2 layers x 3 chunks; each pass of 2 tokens, over the chunk and what came before
    assert WithPass.passes == [([2], 2, 16), ([2], 2, 16), ([2], 2, 32), ([2], 2, 32), ([2], 2, 40), ([2], 2, 40)]
    assert int(llm.cache.pool.num_used) == 0


def test_a_question_after_a_chunked_context_runs_over_the_finished_cache(make):
    from nanokv import SamplingParams

    llm = make("chunk_keep_newest", budget=20)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    context, question = PROMPTS[2], [5, 6, 7]
    [out] = llm.generate([(context, question)], params)
    attention = ChunkedNewest(20)
    for start in range(0, len(context), 16):
        attention.positions = torch.arange(start, min(len(context), start + 16))
        llm.model(torch.tensor(context[start:start + 16]), attention.positions, attention)
    attention.decoding, tokens, ids, at = True, [], question, len(context)
    with torch.inference_mode():
        for _ in range(6):
            attention.positions = torch.arange(at, at + len(ids))
            hidden = llm.model(torch.tensor(ids), attention.positions, attention)
            at += len(ids)
            tokens.append(int(llm.model.compute_logits(hidden[-1:])[0].argmax()))
            ids = tokens[-1:]
    assert out.token_ids == tokens


def test_a_tight_pool_preempts_and_recomputes_every_request(make):
    from nanokv import SamplingParams

    assert_preemption_repeats(lambda **kw: make("chunk_keep_newest", budget=20, **kw), PROMPTS,
                              SamplingParams(max_tokens=30, ignore_eos=True), blocks=20)


def test_a_prompt_longer_than_the_pool_runs_when_its_chunks_fit(make):
    # 100 tokens + 10 would take 2 layers x 7 blocks whole; kept to 20 a chunk of 16 at a time, a
    # layer holds at most 36 (3 blocks) while its chunk runs, so 8 blocks serve it
    per_block = make().cache.pool.bytes_per_block
    small = make("chunk_keep_newest", budget=20, kv_cache_memory=8 * per_block)
    assert greedy(small, PROMPTS[2:], 10) == greedy(make("chunk_keep_newest", budget=20), PROMPTS[2:], 10)
    with pytest.raises(ValueError, match="raise kv_cache_memory"):
        greedy(make(kv_cache_memory=8 * per_block), PROMPTS[2:], 10)
