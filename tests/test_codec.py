"""The tiered cache with any codec (nanokv/cache/codec.py): cold blocks as the codec stores them,
decode attention over the decoded blocks and the residual, importance carried to `encode` through
compaction, and bytes counted per layer."""

from types import SimpleNamespace

import torch

from nanokv.cache.codec import IMPORTANCE, Codec
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.kernels.reference import attention_by_position


class Halves(Codec):
    """Keys and values rounded to float16 (exact for float16 inputs); layer 1 stores keys only
    in their first half of channels (a codec whose bytes differ by layer). Remembers what it was
    handed."""

    def __init__(self, block_size=16):
        self.block_size, self.handed = block_size, []

    def field_shapes(self, head_dim):
        return {"k": (torch.float16, (self.block_size, head_dim)), "v": (torch.float16, (self.block_size, head_dim))}

    def encode(self, k, v, layer, importance):
        self.handed.append((layer, k.clone(), importance))
        if layer == 1:
            k = torch.cat([k[..., :k.shape[-1] // 2], torch.zeros_like(k[..., k.shape[-1] // 2:])], -1)
        return {"k": k, "v": v}

    def decode(self, fields, layer):
        return fields["k"].float(), fields["v"].float()

    def quantized_bytes(self, head_dim, layer=None):
        full = super().quantized_bytes(head_dim)
        return full - (self.block_size * head_dim // 2 * 2 if layer == 1 else 0)


class Ranked(Halves):
    def importance(self, view):
        return view.keys[..., 0]


def cache_with(codec, layers=2, heads=2, blocks=200):
    cfg = SimpleNamespace(num_layers=layers, num_kv_heads=heads, head_dim=64)
    return QuantizedKVCache.from_memory(cfg, blocks * codec.unit_bytes(64), codec, torch.float32)


def fill(cache, seq_id, n, gen):
    """n tokens per head of every layer (float16-exact values), settled."""
    cache.add(seq_id)
    H = cache.num_kv_heads
    k = torch.randn(n, H, 64, generator=gen).half().float()
    v = torch.randn(n, H, 64, generator=gen).half().float()
    for layer in range(cache.num_layers):
        cache.write(cache.append_slots(seq_id, n, layers=slice(layer, layer + 1))[0], k, v, torch.arange(n))
    cache.settle(seq_id)
    return k, v


def test_a_codec_gets_whole_blocks_of_a_layer_and_decode_attends_over_what_it_stored():
    codec = Halves(block_size=16)
    cache, gen = cache_with(codec), torch.Generator().manual_seed(0)
    lengths = [40, 23]
    kv = [fill(cache, i, n, gen) for i, n in enumerate(lengths)]
    assert [c.tolist() for c in (cache.seqs[0].cold_lengths, cache.seqs[1].cold_lengths)] == [[[32, 32]] * 2,
                                                                                             [[16, 16]] * 2]
    assert {layer for layer, *_ in codec.handed} == {0, 1}
    assert all(k.shape[1:] == (16, 64) for _, k, _ in codec.handed)
    q = torch.randn(2, 4, 64, generator=gen)
    seqs = [cache.seqs[i] for i in range(2)]
    pad = lambda t, w: torch.nn.functional.pad(t, (0, w - t.shape[-1]), value=-1)  # noqa: E731
    for layer in range(2):
        group = [torch.stack([pad(s.cold_tables[layer], 3) for s in seqs])[None].expand(2, -1, -1, -1),
                 torch.stack([s.cold_lengths[layer] for s in seqs])[None].expand(2, -1, -1),
                 torch.stack([pad(s.tables[layer], 3) for s in seqs])[None].expand(2, -1, -1, -1),
                 torch.stack([s.lengths[layer] for s in seqs])[None].expand(2, -1, -1)]
        out, nbytes = cache.attend_decode(layer, q, torch.tensor([n - 1 for n in lengths]), group, None)
        for i, ((k, v), n) in enumerate(zip(kv, lengths)):
            keys = k.clone()
            cold = n // 16 * 16
            if layer == 1:  # this layer's codec kept the first half of the cold keys' channels
                keys[:cold, :, 32:] = 0
            expected = attention_by_position(q[i:i + 1], keys, v, torch.tensor([n - 1]), torch.arange(n))
            assert torch.allclose(out[i], expected[0], atol=1e-5)
        cold_tokens = sum(n // 16 * 16 for n in lengths) * 2
        block = 2 * 16 * 64 * 2 - (16 * 64 if layer == 1 else 0)
        assert int(nbytes) == int(cache.read_bytes(group[3][layer])) + cold_tokens // 16 * block


def test_bytes_count_each_layer_with_its_own_block_size():
    codec = Halves(block_size=16)
    cache, gen = cache_with(codec), torch.Generator().manual_seed(1)
    fill(cache, 0, 40, gen)
    residual = 8 * (2 * 64 * 4 + 4)
    per_layer = [2 * (2 * codec.quantized_bytes(64, 0) + residual), 2 * (2 * codec.quantized_bytes(64, 1) + residual)]
    assert per_layer[1] < per_layer[0]
    assert cache.theoretical_bytes(0) == sum(per_layer)


def test_a_ranking_codec_is_handed_each_token_importance_after_compaction():
    codec = Ranked(block_size=16)
    assert codec.ranks_tokens and not Halves().ranks_tokens
    cache, gen = cache_with(codec, layers=1), torch.Generator().manual_seed(2)
    assert IMPORTANCE in cache.pool.fields and cache.carried_fields == (IMPORTANCE,)
    cache.add(0)
    n = 40
    k, v = torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)
    cache.write(cache.append_slots(0, n)[0], k, v, torch.arange(n))
    rank = torch.arange(n, dtype=torch.float32).expand(2, n) * torch.tensor([[1.0], [-1.0]])
    cache.write_prompt(0, 0, n, {IMPORTANCE: rank})
    keep = torch.arange(n).expand(1, 2, n) % 2 == 0                  # every other token: 20 a head
    cache.compact(0, keep)
    cache.settle(0)
    [(layer, keys, importance)] = codec.handed                       # one block of 16 per head
    assert layer == 0 and importance.shape == (2, 16)
    assert torch.equal(importance, rank[:, 0:32:2])
    assert torch.equal(keys, k[0:32:2].transpose(0, 1))


def test_the_engine_ranks_the_prompt_alone_and_after_an_evictor(tiny):
    """Through the scheduler and runner: each token reaches encode with its own importance (here its
    key's first channel) after snapkv has compacted the prompt; decode tokens carry 0."""
    from nanokv.engine.runner import ModelRunner
    from nanokv.engine.scheduler import Scheduler
    from nanokv.engine.sequence import Sequence
    from nanokv.kernels import kernels_for
    from nanokv.methods import make_method
    from nanokv.methods.base import Method
    from nanokv.sampling import SamplingParams

    model, cfg = tiny
    for evictor in (None, "snapkv"):
        codec = Ranked(block_size=16)
        method = (Method() if evictor is None else make_method(evictor, compression=0.5, window_size=4))
        method.quantization = codec
        cache = QuantizedKVCache.from_memory(cfg, 300 * codec.unit_bytes(cfg.head_dim), codec, torch.float32)
        cache.kernels = kernels_for("cpu", "reference", cache.workspace)
        scheduler, runner = Scheduler(cache, 8, 64, method), ModelRunner(model, cache, "cpu", method)
        scheduler.add([Sequence(p, SamplingParams(max_tokens=20, ignore_eos=True), set(), lambda t: "", 256)
                       for p in (list(range(3, 43)), list(range(50, 120)))])
        while not scheduler.finished:
            batch, is_prefill = scheduler.schedule()
            for seq, token in zip(batch, runner.step(batch, is_prefill)):
                seq.append(token)
                if seq.finished:
                    scheduler.finish(seq)
        prompt_blocks = [(k, i) for layer, k, i in codec.handed if (i != 0).all()]
        decode_blocks = [(k, i) for layer, k, i in codec.handed if (i == 0).any()]
        assert prompt_blocks and decode_blocks
        for keys, importance in prompt_blocks:
            assert torch.equal(importance, keys[..., 0].float())
