"""KVzip: the reconstruction scores against a plain loop, the global top-k, the scoring pass's
layout, and the engine's whole path (the pass fed after the prompt, its KV dropped, the kept
set equal to a dense restatement, a question after the context, preemption and recompute)."""

import math
from functools import partial

import pytest
import torch

from nanokv.engine.attention import StepAttention
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from tests.helpers import assert_preemption_repeats


def plain_scores(keys, queries, own_keys, chunks, lengths, sinks):
    """Score per (kv-head, token): one query, one head, one key at a time."""
    H, S, D = keys.shape
    group = queries.shape[1] // H
    scores = torch.zeros(H, S, dtype=torch.float64)
    offset = 0
    for (start, end), m in zip(chunks, lengths):
        s = min(sinks, start)
        for i in range(m):
            for hq in range(queries.shape[1]):
                h = hq // group
                visible = torch.cat([keys[h, :s], keys[h, start:end], own_keys[h, offset:offset + i + 1]])
                probs = (visible.double() @ queries[offset + i, hq].double() / math.sqrt(D)).softmax(0)
                scores[h, start:end] = torch.maximum(scores[h, start:end], probs[s:s + end - start])
        offset += m
    return scores


@pytest.mark.parametrize("chunk_size", [64, 20])
def test_scores_are_the_largest_reconstruction_attention(chunk_size):
    gen = torch.Generator().manual_seed(0)
    S, H, group, D = 50, 2, 3, 8
    method = make_method("kvzip", compression=0.5, chunk_size=chunk_size)
    passes = method.scoring_passes(list(range(S)), lambda text: [7] * (3 if "part" in text else 2), "\n")
    lengths = [len(p) for p in passes]
    keys, queries = torch.randn(H, S, D, generator=gen), torch.randn(sum(lengths), H * group, D, generator=gen)
    own = torch.randn(H, sum(lengths), D, generator=gen)
    view = PrefillView(0, 4, torch.zeros(S, H * group, D), keys, torch.arange(S),
                       scoring_queries=queries, scoring_keys=own, scoring_lengths=lengths)
    want = plain_scores(keys, queries, own, method.chunks(S), lengths, sinks=4)
    assert torch.allclose(method.scores(view).double(), want, atol=1e-6)


def test_each_chunk_is_repeated_in_a_pass_after_its_request():
    encode = {"\n\nRepeat the previous context exactly.": [1, 2],
              "\n\nRepeat the part of the previous context exactly, starting with": [3, 4, 5],
              "<reply>": [9]}.__getitem__
    prompt = list(range(100, 140))
    method = make_method("kvzip", compression=0.5, chunk_size=16)
    assert method.scoring_passes(prompt, encode, "<reply>") == [[1, 2, 9] + prompt[:16],
                                                                [3, 4, 5] + prompt[8:16] + [9] + prompt[16:32],
                                                                [3, 4, 5] + prompt[24:32] + [9] + prompt[32:]]
    assert make_method("kvzip", budget=30).scoring_passes(prompt[:20], encode, "<reply>") == []  # within the budget


def run_layers(method, scores_by_layer):
    """keep_mask and earlier_keep_masks over every layer of one prompt -> [L] kept position lists."""
    L, H, S = scores_by_layer.shape
    method.scores = lambda view: scores_by_layer[view.layer].clone()
    held, state = [None] * L, {}
    for layer in range(L):
        view = PrefillView(layer, L, torch.zeros(S, H, 4), torch.zeros(H, S, 4), torch.arange(S),
                           sequence_state=state, scoring_queries=torch.zeros(1, H, 4), scoring_lengths=[1])
        keep = method.keep_mask(view)
        masks = {layer: keep} if keep is not None else {}
        masks.update(method.earlier_keep_masks(view))
        for at, mask in masks.items():
            held[at] = [torch.nonzero(row).flatten().tolist() for row in mask]
        if layer < L - 1 and not method.layerwise:
            assert keep is None and held[layer] is None  # whole until the last layer is scored
    return held


def test_one_top_k_over_every_layer_and_head_keeps_the_sinks():
    L, H, S = 3, 2, 12
    scores = torch.rand(L, H, S, generator=torch.Generator().manual_seed(1))
    scores[0] += 1.0       # layer 0 matters most: it keeps more than its share
    scores[:, :, :2] = 0   # the sinks score nothing and are kept anyway
    held = run_layers(make_method("kvzip", compression=0.5, sink_tokens=2), scores)
    ranked = scores.clone()
    ranked[:, :, :2] = float("inf")
    top = set(ranked.flatten().topk(L * H * 6).indices.tolist())
    want = [[[p for p in range(S) if (layer * H + h) * S + p in top] for h in range(H)] for layer in range(L)]
    assert held == want
    assert all(h[:2] == [0, 1] for heads in held for h in heads)
    assert sum(len(h) for h in held[0]) > H * 6 > sum(len(h) for h in held[2])

    layerwise = run_layers(make_method("kvzip", compression=0.5, sink_tokens=2, layerwise=True), scores)
    assert [sum(len(h) for h in heads) for heads in layerwise] == [H * 6] * L


def test_an_odd_length_prunes_what_kvpress_prunes():
    # kvpress's compress_post prunes int(pairs x ratio): of L H S = 3 x 3 x 1001 pairs at 0.5,
    # 4504 go and 4505 stay (not L H ceil(S / 2) = 4509); layer-wise, 3003 - 1501 = 1502 a layer
    L, H, S = 3, 3, 1001
    scores = torch.rand(L, H, S, generator=torch.Generator().manual_seed(2))
    held = run_layers(make_method("kvzip", compression=0.5), scores)
    assert sum(len(h) for heads in held for h in heads) == L * H * S - int(L * H * S * 0.5) == 4505
    layerwise = run_layers(make_method("kvzip", compression=0.5, layerwise=True), scores)
    assert [sum(len(h) for h in heads) for heads in layerwise] == [H * S - int(H * S * 0.5)] * L == [1502] * L
    # a budget keeps its B tokens a head on average, as before
    held = run_layers(make_method("kvzip", budget=300), scores)
    assert sum(len(h) for heads in held for h in heads) == L * H * 300


def test_kvzip_options_and_budgets():
    with pytest.raises(ValueError, match="budget=4 must exceed sink_tokens=4"):
        make_method("kvzip", budget=4)
    with pytest.raises(ValueError, match="chunk_size"):
        make_method("kvzip", compression=0.5, chunk_size=8)
    assert make_method("kvzip", compression=0.5).kept_after_prefill(100, 3, 30) == 100
    assert make_method("kvzip", compression=0.5, layerwise=True).kept_after_prefill(100, 3, 30) == 50


# --- in the engine ----------------------------------------------------------------------------

class DenseRecorder:
    """Causal attention over the whole sequence (the model's attention callable), recording
    each layer's queries and keys."""
    def __init__(self):
        self.q, self.k = {}, {}

    def __call__(self, layer, q, k, v, sliding_window):
        self.q[layer], self.k[layer] = q, k
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                               v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)


@pytest.fixture(scope="module")
def kvzip_llm(smollm2_gguf):
    from nanokv import LLM

    return LLM(str(smollm2_gguf), dtype="float32", method="kvzip", compression=0.5, max_num_seqs=2)


PROMPTS = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((120, 64, 160, 90))]
MAX_TOKENS = [4, 1, 2, 1]


@pytest.mark.parametrize("chunk_size", [2048, 48])
@torch.inference_mode()
@pytest.mark.slow
def test_the_engine_keeps_what_a_dense_restatement_keeps(smollm2_gguf, chunk_size):
    """The prompt and each repeat request through the model with plain attention, one pass at a
    time: each layer's reconstruction attention, the sinks, one top-k over all layers; the first
    token comes from the prompt's last position."""
    from nanokv import LLM, SamplingParams
    from tests.test_methods_prefill_wave2 import run_capturing

    llm = LLM(str(smollm2_gguf), dtype="float32", method="kvzip", compression=0.5, chunk_size=chunk_size)
    prompt = PROMPTS[0]
    n, L, H = len(prompt), llm.config.num_layers, llm.config.num_kv_heads
    passes = llm.method.scoring_passes(prompt, lambda t: llm.tokenizer.encode(t, add_special_tokens=False), "\n")
    assert len(passes) == math.ceil(n / chunk_size)
    scores = torch.zeros(L, H, n, dtype=torch.float64)
    for c, tokens in enumerate(passes):
        recorder = DenseRecorder()
        hidden = llm.model(torch.tensor(prompt + tokens), torch.arange(n + len(tokens)), recorder)
        first = int(llm.model.compute_logits(hidden[n - 1:n])[0].argmax())
        chunk = (c * chunk_size, min(n, (c + 1) * chunk_size))
        scores += torch.stack([plain_scores(recorder.k[layer][:n].transpose(0, 1), recorder.q[layer][n:],
                                            recorder.k[layer][n:].transpose(0, 1), [chunk], [len(tokens)], 4)
                               for layer in range(L)])
    scores[:, :, :4] = float("inf")
    top = set(scores.flatten().topk(L * H * math.ceil(n / 2)).indices.tolist())
    want = [[[p for p in range(n) if (layer * H + h) * n + p in top] for h in range(H)] for layer in range(L)]

    outs, [held], _ = run_capturing(llm, [prompt], [1])
    assert outs[0].token_ids == [first]
    agree = sum(len(set(a) & set(b)) for x, y in zip(held, want) for a, b in zip(x, y))
    assert agree >= 0.99 * len(top), f"{agree} of {len(top)} kept slots agree"
    assert sum(len(h) for heads in held for h in heads) == len(top)
    assert len({len(heads[0]) for heads in held}) > 1  # layers keep uneven shares
    assert llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))[0].token_ids == [first]


@pytest.mark.slow
def test_runs_under_continuous_batching_and_frees_real_blocks(kvzip_llm):
    from tests.test_methods_prefill_wave2 import run_capturing

    llm = kvzip_llm
    outs, held, steps = run_capturing(llm, PROMPTS, MAX_TOKENS)
    assert steps[:4] == [([0, 1], True), ([2], True), ([0, 2], False), ([3], True)]
    per_block = llm.cache.pool.bytes_per_block
    for prompt, out, layers, max_tokens in zip(PROMPTS, outs, held, MAX_TOKENS):
        n = len(prompt)
        assert len(out.token_ids) == max_tokens
        assert all(h[:4] == [0, 1, 2, 3] for heads in layers for h in heads)  # sinks
        generated = [p for heads in layers for h in heads for p in h if p >= n]
        assert generated == list(range(n, n + max_tokens - 1)) * (len(layers) * len(layers[0]))
        assert sum(len(h) for heads in layers for h in heads) - len(generated) == \
            len(layers) * len(layers[0]) * math.ceil(n / 2)
        blocks = sum(math.ceil(len(h) / 16) for heads in layers for h in heads)
        assert out.metrics["kv_cache_bytes"] == blocks * per_block < out.metrics["kv_cache_bytes_uncompressed"]
    _, [alone], _ = run_capturing(llm, [PROMPTS[2]], [MAX_TOKENS[2]])
    assert alone == held[2]


@pytest.mark.slow
def test_a_question_after_the_context_reads_the_compressed_context(kvzip_llm):
    """(context, question): the context is scored and compressed first; the question then runs
    over the compressed cache, as a question asked later would, and is kept whole."""
    from tests.test_methods_prefill_wave2 import run_capturing

    llm = kvzip_llm
    context, question = PROMPTS[2], [300 + j for j in range(10)]
    _, [alone], _ = run_capturing(llm, [context], [1])
    outs, [held], _ = run_capturing(llm, [(context, question)], [3])
    n = len(context)
    assert [[[p for p in h if p < n] for h in heads] for heads in held] == alone
    assert all([p for p in h if p >= n] == list(range(n, n + 12)) for heads in held for h in heads)
    # the same as the context compressed alone, then the question fed one token at a time
    cache, method = llm.cache, llm.method
    [tokens] = method.scoring_passes(context, lambda t: llm.tokenizer.encode(t, add_special_tokens=False), "\n")
    cache.add(-1)
    try:
        with torch.inference_mode():
            positions = torch.arange(n + len(tokens))
            llm.model(torch.tensor(context + tokens), positions,
                      StepAttention(cache, [-1], [len(positions)], positions, method, [n], None, [[len(tokens)]]))
            for p, token in enumerate(question, start=n):
                step = torch.tensor([p])
                hidden = llm.model(torch.tensor([token]), step, StepAttention(cache, [-1], [1], step))
            assert outs[0].token_ids[0] == int(llm.model.compute_logits(hidden)[0].argmax())
    finally:
        cache.free(-1)


@pytest.mark.slow
def test_preemption_recomputes_the_same_cache(smollm2_gguf, kvzip_llm):
    from nanokv import LLM, SamplingParams

    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(60)] for i in range(6)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    tight, got = assert_preemption_repeats(partial(LLM, str(smollm2_gguf), dtype="float32", method="kvzip",
                                                   compression=0.5), prompts, params, 1200, kvzip_llm)
