"""ThinK: older keys stored in fewer channels (nanokv/cache/pruned_cache.py). Pruned-channel
attention against attention with those channels zeroed, the channel scores against the paper's
formula, the engine against a dense restatement, real bytes, preemption and bad settings."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from nanokv.kernels.reference import attention_by_position, pruned_attention
from nanokv.cache.pruned_cache import PrunedKVCache
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from tests.helpers import assert_preemption_repeats, restated_greedy


def test_pruned_channel_attention_equals_attention_with_those_channels_zeroed():
    gen = torch.Generator().manual_seed(0)
    cfg = SimpleNamespace(num_layers=1, num_kv_heads=2, head_dim=16)
    cache = PrunedKVCache.from_memory(cfg, 1 << 20, 4, 4, torch.float32)
    assert cache.pool.slim_block_size == 4 * (2 * 16 * 4 + 4) // ((4 + 16) * 4 + 4) == 6  # slim tokens a block
    n, counts = 23, torch.tensor([17, 9])
    k, v = torch.randn(n, 2, 16, generator=gen), torch.randn(n, 2, 16, generator=gen)
    positions = torch.arange(n) * 3
    cache.add(0)
    cache.write(cache.append_slots(0, n)[0], k, v, positions)
    channels = torch.stack([torch.randperm(16, generator=gen)[:4].sort().values for _ in range(2)])
    cache.prune(0, 0, channels, counts)
    s = cache.seqs[0]
    assert s.cold_lengths[0].tolist() == [17, 9] and s.lengths[0].tolist() == [6, 14]
    assert s.num_cold[0].tolist() == [3, 2] and s.num_blocks[0].tolist() == [2, 4]  # the rest went back
    q = torch.randn(3, 4, 16, generator=gen)          # 2 query heads a kv-head
    q_pos = torch.tensor([40, 60, 80])
    slim, f = (*cache.cold_held(0, 0), s.channels[:1]), cache.pool.slim_fields
    tables, lengths = s.tables[:, :, :int(s.num_blocks.max())], s.lengths
    out = pruned_attention(q[None], q_pos[None], f["k"], f["v"], f["pos"], *slim, cache.pool.k, cache.pool.v,
                           cache.pool.pos, tables, lengths)[0]
    for h in range(2):  # each kv-head alone, densely: its slim tokens' keys with the other channels zeroed
        zeroed = k[:, h].clone()
        dropped = torch.ones(16, dtype=torch.bool)
        dropped[channels[h]] = False
        zeroed[:int(counts[h])][:, dropped] = 0
        expected = attention_by_position(q[:, 2 * h:2 * h + 2], zeroed[:, None], v[:, h:h + 1], q_pos, positions)
        torch.testing.assert_close(out[:, 2 * h:2 * h + 2], expected, atol=1e-5, rtol=1e-5)


def test_channels_keep_the_highest_query_times_key_energy_per_kv_head():
    gen = torch.Generator().manual_seed(1)
    H, Hq, S, D = 2, 4, 50, 16
    view = PrefillView(0, 1, torch.randn(S, Hq, D, generator=gen), torch.randn(H, S, D, generator=gen), torch.arange(S))
    think = make_method("think", channel_ratio=0.25)
    keep = torch.rand(H, S, generator=gen) > 0.3
    got = think.key_channels(view, keep)
    assert got.shape == (H, 12)  # 16 - int(16 x 0.25)
    for h in range(H):
        scores = []
        for c in range(D):
            q2 = sum(float(view.queries[t, g, c]) ** 2 for t in range(S - 32, S) for g in (2 * h, 2 * h + 1)) / 64
            kept = [s for s in range(S) if keep[h, s]]
            k2 = sum(float(view.keys[h, s, c]) ** 2 for s in kept) / len(kept)
            scores.append(q2 * k2)
        assert got[h].tolist() == sorted(sorted(range(D), key=lambda c: -scores[c])[:12])


class ThinKDense:
    """A restatement: plain attention over every token so far; at the end of the prompt's pass each
    layer keeps the method's tokens, whose oldest (all but `recent`) keys lose the channels the
    method drops (zeroed); later tokens are kept whole."""

    def __init__(self, method, num_layers):
        self.method, self.num_layers, self.kv = method, num_layers, {}

    def __call__(self, layer, q, k, v, sliding_window):
        if layer not in self.kv:  # the prompt: attends over itself whole, then is compressed
            out = attention_by_position(q, k, v, self.positions, self.positions, sliding_window)
            view = PrefillView(layer, self.num_layers, q, k.transpose(0, 1), self.positions)
            keep = self.method.keep_mask(view)
            keep = torch.ones(k.shape[1], len(k), dtype=torch.bool) if keep is None else keep
            channels = self.method.key_channels(view, keep)
            heads = []
            for h in range(k.shape[1]):
                k_h, v_h, pos_h = k[keep[h], h].clone(), v[keep[h], h], self.positions[keep[h]]
                dropped = torch.ones(k.shape[-1], dtype=torch.bool)
                dropped[channels[h]] = False
                k_h[:max(0, len(k_h) - self.method.recent)][:, dropped] = 0
                heads.append([k_h, v_h, pos_h])
            self.kv[layer] = heads
            return out
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        for h, held in enumerate(self.kv[layer]):
            held[0], held[1] = torch.cat([held[0], k[:, h]]), torch.cat([held[1], v[:, h]])
            held[2] = torch.cat([held[2], self.positions])
            out[:, h * group:(h + 1) * group] = attention_by_position(q[:, h * group:(h + 1) * group], held[0][:, None],
                                                                      held[1][:, None], self.positions, held[2])
        return out


@pytest.mark.parametrize("compression", [0.0, 0.5])
@torch.inference_mode()
@pytest.mark.slow
def test_the_engine_equals_a_dense_restatement_and_frees_real_bytes(smollm2_gguf, compression):
    from nanokv import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf), dtype="float32", method="think", compression=compression, max_num_seqs=2)
    prompts = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((70, 30, 120))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    D, kD = 64, 64 - int(64 * 0.4)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == restated_greedy(llm.model, ThinKDense(llm.method, 30), prompt, 6)
        kept = math.ceil((1 - compression) * len(prompt)) if compression else len(prompt)
        slim = max(0, kept - 32)
        full = kept - slim + 5
        theory = 30 * 3 * (slim * ((kD + D) * 4 + 4) + full * (2 * D * 4 + 4) + kD)
        assert out.metrics["kv_cache_bytes_theory"] == theory
        per_block = llm.cache.pool.bytes_per_block
        blocks = 30 * 3 * (math.ceil(slim / llm.cache.pool.slim_block_size) + math.ceil(full / 16))
        assert out.metrics["kv_cache_bytes"] == blocks * per_block
        if slim > 200:
            assert out.metrics["kv_cache_bytes"] / theory < 1.1


@pytest.mark.slow
def test_preemption_recomputes_the_same_tokens(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(60)] for i in range(6)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    assert_preemption_repeats(partial(LLM, str(smollm2_gguf), dtype="float32", method="think", compression=0.25),
                              prompts, params, 850)


@pytest.mark.slow
def test_bad_settings_are_clear_errors(smollm2_gguf):
    from nanokv import LLM

    with pytest.raises(ValueError, match=r"channel_ratio=1.0 of method 'think' must be a number in \(0, 1\)"):
        make_method("think", channel_ratio=1.0)
    with pytest.raises(ValueError, match="think keeps older keys in fewer channels, which quantized blocks cannot hold"):
        LLM(str(smollm2_gguf), method="think+kivi", compression=0.5)
