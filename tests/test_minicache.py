"""MiniCache: the SLERP merge and its restore on hand-built vectors and through the cache, the
retained tokens, the engine against a dense restatement (paired layers' prompts merged after
prefill), the blocks and bytes the later layer of each pair gives back, preemption, options."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from nanokv.kernels.reference import attention_by_position, restored
from nanokv.cache.paired import PairedKVCache
from nanokv.methods import make_method
from nanokv.methods.minicache import slerp_merge
from tests.helpers import assert_preemption_repeats

L, H, D = 30, 3, 64  # SmolLM2-135M: layers, kv-heads, head_dim


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def angle(x, y):
    return math.degrees(math.acos(float((unit(x) * unit(y)).sum().clamp(-1, 1))))


# --- the merge and its restore ----------------------------------------------------------

def test_slerp_direction_and_magnitudes_follow_the_formula():
    e, mag_a, mag_b, distance = slerp_merge(torch.tensor([[3.0, 0, 0]]), torch.tensor([[0, 0.5, 0]]), 0.6)
    assert angle(e[0], torch.tensor([1.0, 0, 0])) == pytest.approx(0.6 * 90, abs=1e-4)  # t weighs the later layer
    assert angle(e[0], torch.tensor([0, 1.0, 0])) == pytest.approx(0.4 * 90, abs=1e-4)
    assert float(e.norm()) == pytest.approx(1, abs=1e-6) and float(distance[0]) == pytest.approx(0.5)
    assert (float(mag_a[0]), float(mag_b[0])) == (3.0, 0.5)
    # general vectors: SLERP written out independently; restoring sets each layer's norm back
    gen = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2, 50, 16, generator=gen), torch.randn(2, 50, 16, generator=gen)
    e, mag_a, mag_b, distance = slerp_merge(x_a, x_b, 0.3)
    omega = torch.acos((unit(x_a) * unit(x_b)).sum(-1))
    expected = (torch.sin(0.7 * omega) / torch.sin(omega))[..., None] * unit(x_a) + \
        (torch.sin(0.3 * omega) / torch.sin(omega))[..., None] * unit(x_b)
    assert torch.allclose(e, expected, atol=1e-5) and torch.allclose(distance, omega / math.pi)
    assert torch.allclose(restored(e, mag_b).norm(dim=-1), x_b.norm(dim=-1), rtol=1e-6)
    same, _, _, zero = slerp_merge(x_a, 2 * x_a, 0.6)  # parallel: the LERP fallback, the same direction
    assert torch.allclose(same, unit(x_a), atol=1e-6) and float(zero.max()) < 1e-3


def paired_cache(layers=2, heads=2, head_dim=8, block_size=4):
    cfg = SimpleNamespace(num_layers=layers, num_kv_heads=heads, head_dim=head_dim)
    cache = PairedKVCache.from_memory(cfg, 1 << 20, block_size, torch.float32,
                                      extra_fields=make_method("minicache", compression=0.25).slot_fields)
    cache.pair_layers([(0, 1)])
    cache.add(0)
    return cache


def test_identical_layers_merge_and_restore_exactly_through_the_cache():
    """Layer b's K/V equal to layer a's: the merged direction is theirs, and both layers read back
    their own vectors (a from its blocks, b from a's merged slots and its retained ones), while b
    keeps only ceil(0.05 S) tokens of its own."""
    cache, S = paired_cache(), 37
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(S, 2, 8, generator=gen), torch.randn(S, 2, 8, generator=gen)
    for layer in (0, 1):
        slots = cache.append_slots(0, S, layers=slice(layer, layer + 1))[0]
        cache.write(slots, k, v, torch.arange(S))
    method = make_method("minicache", compression=0.25)
    cache.store_merged(0, 1, S, method.merge_pair(*cache.pair_prompt(0, 1, S)))
    s = cache.seqs[0]
    assert s.lengths.tolist() == [[S, S], [2, 2]] and s.num_blocks.tolist() == [[10, 10], [1, 1]]
    tables = s.tables[:, :, :10]
    keys_a = cache.pool.k[cache.pool.slot_index(cache.flat_slots(tables[0], torch.arange(S).expand(2, S)))]
    assert torch.allclose(keys_a, k.transpose(0, 1), atol=1e-6)
    keys, values, k_pos, lengths = cache.read_second(tables[0][None], s.lengths[0][None], tables[1][None],
                                                     s.lengths[1][None])
    seen = k_pos[0] < S                                    # every token exactly once: merged (a) or its own (b)
    assert sorted(k_pos[0, 0][seen[0]].tolist()) == list(range(S)) == sorted(k_pos[0, 1][seen[1]].tolist())
    for h in range(2):
        order = k_pos[0, h][seen[h]].argsort()
        assert torch.allclose(keys[0, h][seen[h]][order], k[:, h], atol=1e-5)
        assert torch.allclose(values[0, h][seen[h]][order], v[:, h], atol=1e-5)


# --- retention ------------------------------------------------------------------------------

@pytest.mark.parametrize("S", [40, 41])
def test_the_tokens_whose_keys_lie_farthest_apart_are_kept_whole(S):
    """Per head the top ceil(0.05 S) tokens by the keys' angular distance keep their own K and V in
    both layers (their values are identical: keys alone decide); the rest merge."""
    gen = torch.Generator().manual_seed(2)
    angles = torch.stack([torch.randperm(S, generator=gen) for _ in range(2)]).float() * (3.0 / S)  # [H, S] < pi
    keys_a = torch.zeros(2, S, 4)
    keys_a[..., 0] = 2.0
    keys_b = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros_like(angles), torch.zeros_like(angles)], -1)
    values = torch.randn(2, S, 4, generator=gen)
    out = make_method("minicache", compression=0.25).merge_pair(keys_a, values, keys_b, values)
    k = math.ceil(0.05 * S)
    for h in range(2):
        assert sorted(out["keep"][h].nonzero().flatten().tolist()) == sorted(angles[h].argsort()[-k:].tolist())
    keep = out["keep"]
    assert torch.equal(out["k"][keep], keys_a[keep]) and (out["k_mag_b"][keep] == 0).all()
    assert torch.allclose(out["k_mag_b"][~keep], torch.ones(S * 2 - 2 * k))
    assert torch.allclose(out["v_mag_b"][~keep], values.norm(dim=-1)[~keep])
    merged = out["k"][~keep]                                        # e |k_a|: 0.6 of the way to k_b
    assert torch.allclose(merged.norm(dim=-1), torch.full((len(merged),), 2.0))
    assert torch.allclose(torch.atan2(merged[:, 1], merged[:, 0]), 0.6 * angles[~keep], atol=1e-5)


# --- the engine -------------------------------------------------------------------------------

class PlainMiniCache:
    """A dense restatement for one sequence: each layer keeps its K/V whole; the first call is the
    prompt, which attends over itself unmerged; then each pair's prompt K/V becomes, per token and
    head, SLERP(direction) x own magnitude, except the top ceil(gamma n) tokens by key angle, which
    keep their own; later tokens are appended as they are."""

    def __init__(self, pairs, t=0.6, gamma=0.05):
        self.second = {b: a for a, b in pairs}
        self.t, self.gamma, self.kv = t, gamma, {}

    def merge(self, a, b):
        (k_a, v_a), (k_b, v_b) = self.kv[a], self.kv[b]          # [n, H, D] each
        n, t = len(k_a), self.t

        def directions(x, y):
            cos = (unit(x) * unit(y)).sum(-1).clamp(-1, 1)
            omega = torch.acos(cos)
            e = (torch.sin((1 - t) * omega) / torch.sin(omega))[..., None] * unit(x) + \
                (torch.sin(t * omega) / torch.sin(omega))[..., None] * unit(y)
            return unit(e), omega

        e_k, omega = directions(k_a, k_b)
        e_v, _ = directions(v_a, v_b)
        whole = torch.zeros(n, k_a.shape[1], dtype=torch.bool)
        for h in range(k_a.shape[1]):
            whole[omega[:, h].argsort(descending=True)[:math.ceil(self.gamma * n)], h] = True
        w = whole[..., None]
        for layer, (k, v) in ((a, (k_a, v_a)), (b, (k_b, v_b))):
            self.kv[layer] = (torch.where(w, k, e_k * k.norm(dim=-1, keepdim=True)),
                              torch.where(w, v, e_v * v.norm(dim=-1, keepdim=True)))

    def __call__(self, layer, q, k, v, sliding_window):
        pos = self.positions
        if layer not in self.kv:                                  # the prompt, unmerged
            self.kv[layer], self.pos = (k.float(), v.float()), pos
            out = attention_by_position(q, k, v, pos, pos, sliding_window)
            if layer in self.second:
                self.merge(self.second[layer], layer)
            return out
        keys, values = self.kv[layer]
        self.kv[layer] = (torch.cat([keys, k.float()]), torch.cat([values, v.float()]))
        if layer == 0:
            self.pos = torch.cat([self.pos, pos])
        return attention_by_position(q, *self.kv[layer], pos, self.pos, sliding_window)


@torch.inference_mode()
def plain_greedy(model, attention, ids, n, steps):
    """Greedy tokens: the first n ids (merged after), then the rest of `ids`, then one at a time."""
    tokens, start = [], 0
    for part in (ids[:n], ids[n:]):
        if part:
            attention.positions = torch.arange(start, start + len(part))
            hidden = model(torch.tensor(part), attention.positions, attention)
            start += len(part)
    for _ in range(steps):
        tokens.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
        attention.positions = torch.tensor([start])
        hidden = model(torch.tensor(tokens[-1:]), attention.positions, attention)
        start += 1
    return tokens


def ids(seed, n):
    return [100 + (seed * 31 + j * 13) % 5000 for j in range(n)]


PROMPTS = [ids(1, 90), ids(2, 25), (ids(3, 70), ids(4, 12))]  # the last: a question after a context
STEPS = 6


@pytest.fixture(scope="module")
def served(smollm2_gguf):
    """The engine over PROMPTS in one batch, and each sequence's lengths and blocks as it finished."""
    from nanokv import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), dtype="float32", method="minicache", compression=0.25)
    held, finish = {}, llm.scheduler.finish

    def capture(seq):
        s = llm.cache.seqs[seq.id]
        held[seq.id] = (s.lengths.clone(), s.num_blocks.clone())
        finish(seq)

    llm.scheduler.finish = capture
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=STEPS, ignore_eos=True))
    del llm.scheduler.finish
    return llm, outs, [held[i] for i in sorted(held)]


@pytest.mark.slow
def test_engine_matches_a_dense_restatement(served):
    llm, outs, _ = served
    pairs = llm.cache.pairs
    assert pairs == [(a, a + 1) for a in range(14, 30, 2)]    # 8 = round(0.25 x 30) pairs at the top
    for prompt, out in zip(PROMPTS, outs):
        context, question = prompt if isinstance(prompt, tuple) else (prompt, [])
        expected = plain_greedy(llm.model, PlainMiniCache(pairs), context + question, len(context), STEPS)
        assert out.token_ids == expected
    full = plain_greedy(llm.model, PlainMiniCache([]), PROMPTS[0], 90, STEPS)
    assert full != outs[0].token_ids  # the merge changes what the model reads (this prompt's greedy tokens)


def paper_bytes(n, g, pairs, s=4, m=4):
    """MiniCache's own figure per kv-head (methods/minicache.py): n prompt tokens merged in the
    pairs but ceil(0.05 n), g tokens after the prompt; K, V of s bytes, positions, magnitudes of m."""
    token, r = 2 * D * s + 4, math.ceil(0.05 * n)
    return (L - 2 * pairs) * (n + g) * token + pairs * ((n - r) * (token + 4 * m) + (r + g) * 2 * token)


@pytest.mark.slow
def test_the_later_layer_of_each_pair_holds_only_its_retained_and_later_tokens(served):
    llm, outs, held = served
    cache, block = llm.cache, llm.cache.block_size
    seconds = [b for _, b in cache.pairs]
    for prompt, out, (lengths, blocks) in zip(PROMPTS, outs, held):
        n = len(prompt[0]) if isinstance(prompt, tuple) else len(prompt)
        total = len(prompt[0]) + len(prompt[1]) if isinstance(prompt, tuple) else n
        after = total - n + STEPS - 1                          # the question and the decoded tokens
        for layer in range(L):
            want = math.ceil(0.05 * n) + after if layer in seconds else n + after
            assert (lengths[layer] == want).all() and (blocks[layer] == math.ceil(want / block)).all()
        m = out.metrics
        assert m["kv_cache_bytes"] == int(blocks.sum()) * cache.pool.bytes_per_block
        theory = H * paper_bytes(n, after, len(seconds))
        assert abs(m["kv_cache_bytes_theory"] / theory - 1) < 0.1
        full = L * H * math.ceil((total + STEPS - 1) / block) * block * (2 * D * 4 + 4)
        assert m["kv_cache_bytes_uncompressed"] == full and m["kv_cache_bytes"] < full
        if prompt is PROMPTS[0]:  # 95 tokens fill 6 blocks of 16 (a short prompt's rounding is large)
            assert abs(m["kv_cache_bytes"] / theory - 1) < 0.1 and m["kv_cache_bytes"] < 0.85 * full
    assert cache.pool.num_free == cache.pool.usable_blocks


@pytest.mark.slow
def test_preemption_recomputes_the_same_tokens(served, smollm2_gguf):
    from nanokv import LLM, SamplingParams

    roomy = served[0]
    prompts = [ids(10 + i, 30) for i in range(3)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    # 400 blocks: two prompts prefill (180 blocks each at most), both cross into a third block at
    # token 33 (66 blocks each, 88 free): the younger is preempted, then recomputed
    tight, _ = assert_preemption_repeats(partial(LLM, str(smollm2_gguf), dtype="float32", method="minicache",
                                                 compression=0.25), prompts, params, 400, roomy)
    assert tight.cache.pool.num_free == tight.cache.pool.usable_blocks


# --- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=64), "not budget"),
    (dict(compression=0.6), "at most 0.5"),
    (dict(compression=0.25, interpolation=1.5), r"interpolation=1.5 .* in \[0, 1\]"),
    (dict(compression=0.25, retention=-0.1), r"retention=-0.1 .* in \[0, 1\]"),
    (dict(compression=0.25, window=4), "unknown option 'window'"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method("minicache", **kwargs)


def test_settings_that_merge_nothing_or_mix_with_quantization_are_refused():
    with pytest.raises(ValueError, match="merges no layer pair of a 30-layer model"):
        make_method("minicache", compression=0.01).layer_pairs(30)
    with pytest.raises(ValueError, match="minicache"):
        make_method("minicache+kivi", compression=0.25)
    method = make_method("minicache", compression=0.5)
    assert method.layer_pairs(30) == [(a, a + 1) for a in range(0, 30, 2)]
    assert [method.kept_after_prefill(100, layer, 30) for layer in (0, 1)] == [100, 5]
    assert make_method("minicache").layer_pairs(30) is None          # compression 0: nothing merged
