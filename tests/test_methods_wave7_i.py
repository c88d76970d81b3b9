"""CacheBlend (nanokv/methods/cacheblend.py; engine/blending.py): each chunk of the context prefilled
alone, then the tokens whose keys deviate most at the check layer recomputed over the blended cache.
The engine's greedy tokens equal a plain restatement (dense attention with a block-diagonal mask,
then a blend pass that overwrites the picked tokens' K/V); recomputing everything, or one chunk
holding the whole context, gives full's tokens; a recompute after preemption repeats them."""

import pytest
import torch

from helpers import assert_preemption_repeats
from nanokv.kernels.reference import attention_by_position
from nanokv.methods.cacheblend import CacheBlend
from tiny_model import save_tiny_llama

CONTEXT = [(7 * i + 3) % 250 for i in range(90)]
QUESTION = [40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """The tiny Llama (1 kv-head of 64) with 4 layers: the check layer 1 leaves 2 narrowed layers."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), num_layers=4)


def engine(path, method="cacheblend", **kw):
    from nanokv import LLM

    return LLM(str(path), dtype="float32", method=method, **kw)


def greedy(llm, prompts, steps=10):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


# --- a plain restatement --------------------------------------------------------------------------

def chunk_ids(n, chunk, separator=-1, ids=None):
    """[n] the chunk of each token, counted afresh: a new chunk after a separator and every `chunk`."""
    out, current, length = [], 0, 0
    for i in range(n):
        out.append(current)
        length += 1
        if length == chunk or (ids is not None and ids[i] == separator):
            current, length = current + 1, 0
    return torch.tensor(out)


class ChunksAloneDense:
    """Every context token over the earlier tokens of its own chunk (a block-diagonal causal mask)."""

    def __init__(self, chunks):
        self.chunks, self.layers = chunks, {}

    def __call__(self, layer, q, k, v, sliding_window):
        self.layers[layer] = (k.clone(), v.clone())
        scores = torch.einsum("thd,shd->hts", q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], 1))
        pos = torch.arange(len(q))
        allowed = (pos[None, :] <= pos[:, None]) & (self.chunks[None, :] == self.chunks[:, None])
        scores = (scores / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
        values = v.float().repeat_interleave(q.shape[1] // v.shape[1], 1)
        return torch.einsum("hts,shd->thd", scores.softmax(-1), values).to(q.dtype)


class BlendDense:
    """The blend pass: before `check` every token overwrites its K/V; at `check` the int(n * ratio)
    largest key distances (and the last token) go on; they alone overwrite theirs from there."""

    def __init__(self, layers, check, ratio, on_values=False):
        self.layers, self.check, self.ratio, self.rows, self.on_values = layers, check, ratio, None, on_values

    def __call__(self, layer, q, k, v, sliding_window):
        keys, values = (x.clone() for x in self.layers[layer])
        n = len(keys)
        rows = torch.arange(n) if self.rows is None else self.rows  # the tokens this layer computes
        go_on = torch.arange(len(q))
        if layer == self.check:
            new, cached = (v, values) if self.on_values else (k, keys)
            distance = ((new.float() - cached.float()) ** 2).sum(dim=(1, 2))
            picked = torch.zeros(n, dtype=torch.bool)
            picked[distance.sort(descending=True).indices[:int(n * self.ratio)]] = True
            picked[-1] = True
            go_on = self.picked = picked.nonzero().flatten()
            rows = rows[go_on]
        keys[rows], values[rows] = k[go_on], v[go_on]
        self.layers[layer] = (keys, values)
        out = torch.zeros_like(q)  # the tokens that stop at the check layer leave with zeros
        out[go_on] = attention_by_position(q[go_on], keys, values, rows, torch.arange(n))
        return out

    def narrow(self, layer):
        if layer == self.check:
            self.rows = self.picked
            return self.picked
        return None


class Dense:
    """What follows the context (a question, each decoded token) over the blended cache and itself."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, layer, q, k, v, sliding_window):
        keys, values = self.layers[layer]
        keys, values = torch.cat([keys, k]), torch.cat([values, v])
        self.layers[layer] = (keys, values)
        return attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))


@torch.inference_mode()
def restated(model, context, question, steps, chunk, ratio=0.15, check=1, separator=-1, deviation="keys"):
    n = len(context)
    positions = torch.arange(n)
    alone = ChunksAloneDense(chunk_ids(n, chunk, separator, context))
    model(torch.tensor(context), positions, alone)
    blend = BlendDense(alone.layers, check, ratio, deviation == "values")
    hidden = model(torch.tensor(context), positions, blend)
    dense, ids, start, tokens = Dense(blend.layers), question, n, []
    for _ in range(steps):
        if ids:
            dense.positions = torch.arange(start, start + len(ids))
            hidden = model(torch.tensor(ids), dense.positions, dense)
            start += len(ids)
        tokens.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
        ids = tokens[-1:]
    return tokens


# --- hand-built ---------------------------------------------------------------------------------

def test_chunks_end_after_a_separator_and_every_chunk_tokens():
    method = CacheBlend(chunk_tokens=4, separator_id=9)
    assert method.chunk_lengths([1, 9, 2, 3, 4, 5, 6, 9, 9, 7]) == [2, 4, 2, 1, 1]
    assert CacheBlend(chunk_tokens=256).chunk_lengths(list(range(300))) == [256, 44]
    assert CacheBlend(chunk_tokens=5).chunk_lengths(list(range(10))) == [5, 5]


def kv_moved_by(distance, field="k", H=2, D=3):
    """new and cached {"k", "v"} [H, T, D] where each token's `field` moved by a squared distance
    distance[t] (spread evenly over heads and channels) and the other field not at all."""
    T = len(distance)
    cached = {"k": torch.randn(H, T, D), "v": torch.randn(H, T, D)}
    step = (torch.tensor(distance) / (H * D)).sqrt()
    new = {"k": cached["k"].clone(), "v": cached["v"].clone()}
    new[field] = cached[field] + step[None, :, None]
    return new, cached


def test_the_largest_deviations_and_the_last_token_are_recomputed():
    distance = [0.5, 9.0, 0.1, 7.0, 0.2, 3.0, 0.0, 0.3, 8.0, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 0.05]
    # int(20 * 0.15) = 3 largest: 9.0, 8.0, 7.0; and the last
    assert CacheBlend().recompute(*kv_moved_by(distance)).nonzero().flatten().tolist() == [1, 3, 8, 19]
    # the last among the largest: no extra token
    assert CacheBlend(recompute_ratio=0.1).recompute(*kv_moved_by([0.0, 5.0, 1.0, 9.0])).tolist() == \
        [False, False, False, True]
    # at least one token, whatever the ratio
    assert CacheBlend(recompute_ratio=0.01).recompute(*kv_moved_by([2.0, 1.0, 0.0])).tolist() == [True, False, True]


def test_the_deviation_is_measured_on_the_keys_or_on_the_values():
    distance = [0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # int(10 * 0.15) = 1: token 1 if seen
    new, cached = kv_moved_by(distance, field="v")
    new["k"][:, 5] += 1.0  # the keys moved elsewhere: token 5
    assert CacheBlend(deviation="values").recompute(new, cached).nonzero().flatten().tolist() == [1, 9]
    assert CacheBlend(deviation="keys").recompute(new, cached).nonzero().flatten().tolist() == [5, 9]


# --- the engine against the restatement ---------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(chunk_tokens=16), dict(chunk_tokens=32, recompute_ratio=0.4),
                                dict(chunk_tokens=64, separator_id=CONTEXT[20], check_layer=2),
                                dict(chunk_tokens=16, deviation="values")])
def test_greedy_tokens_equal_a_plain_restatement(tiny4, kw):
    llm = engine(tiny4, **kw)
    [got] = greedy(llm, [CONTEXT], 10)
    options = dict(ratio=kw.get("recompute_ratio", 0.15), check=kw.get("check_layer", 1),
                   separator=kw.get("separator_id", -1), deviation=kw.get("deviation", "keys"))
    assert got == restated(llm.model, CONTEXT, [], 10, kw["chunk_tokens"], **options)
    assert got != greedy(engine(tiny4, "full"), [CONTEXT], 10)[0]  # the blend is not full's prefill
    # recomputed per layer: every token up to the check layer, then int(n * ratio) and maybe the last
    check, n = options["check"], len(CONTEXT)
    recomputed = llm.runner.last_blend.recomputed
    assert recomputed[:check] == [n] * check
    assert recomputed[check:] == [recomputed[check]] * (4 - check)
    assert recomputed[check] in (int(n * options["ratio"]), int(n * options["ratio"]) + 1)


def test_a_question_after_the_context_is_prefilled_whole_over_the_blend(tiny4):
    llm = engine(tiny4, chunk_tokens=24)
    [got] = greedy(llm, [(CONTEXT, QUESTION)], 8)
    assert got == restated(llm.model, CONTEXT, QUESTION, 8, 24)


@pytest.mark.parametrize("model", ["tiny_gqa_dir", "tiny_qwen2_gqa_dir"])
def test_grouped_heads_equal_the_restatement(model, request):
    llm = engine(request.getfixturevalue(model), chunk_tokens=20, recompute_ratio=0.3)
    [got] = greedy(llm, [CONTEXT[:70]], 8)
    assert got == restated(llm.model, CONTEXT[:70], [], 8, 20, ratio=0.3)


def test_recomputing_everything_or_one_chunk_gives_full_tokens(tiny4):
    prompts = [CONTEXT, CONTEXT[:45]]
    full = greedy(engine(tiny4, "full"), prompts)
    assert greedy(engine(tiny4, chunk_tokens=16, recompute_ratio=1.0), prompts) == full
    # one chunk: its tokens alone are the whole context, so the cached K/V already are full's
    assert greedy(engine(tiny4, chunk_tokens=256), prompts) == full


def test_every_token_stays_in_the_cache(tiny4):
    blend, full = engine(tiny4, chunk_tokens=16), engine(tiny4, "full")
    greedy(blend, [CONTEXT], 4), greedy(full, [CONTEXT], 4)
    assert blend.stats["peak_kv_bytes"] == full.stats["peak_kv_bytes"] > 0
    assert int(blend.cache.pool.num_used) == 0  # every block given back


def test_a_tight_pool_preempts_and_recomputes_to_the_same_tokens(tiny4):
    from nanokv import SamplingParams

    prompts = [CONTEXT[i:i + 40] for i in range(0, 18, 6)]
    assert_preemption_repeats(lambda **kw: engine(tiny4, chunk_tokens=12, **kw), prompts,
                              SamplingParams(max_tokens=26, ignore_eos=True), blocks=30)


@pytest.mark.parametrize("kw, message", [
    (dict(recompute_ratio=0.0), "recompute_ratio"), (dict(recompute_ratio=1.5), "recompute_ratio"),
    (dict(check_layer=0), "check_layer"), (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(separator_id=-2), "separator_id"), (dict(deviation="queries"), "deviation"),
    (dict(compression=0.5), "no compression or budget"),
    (dict(budget=64), "no compression or budget"),
])
def test_bad_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        CacheBlend(**kw)


def test_quantized_blocks_are_refused():
    from nanokv.methods.registry import make_method

    with pytest.raises(ValueError, match="overwrites recomputed tokens' K/V in place"):
        make_method("cacheblend+kivi")
