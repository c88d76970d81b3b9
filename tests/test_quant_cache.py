"""The quantized block kind: pool layout and bytes, the residual flush, attention over it, and
kivi / int4 / int8 end to end against a plain restatement of the method."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import restated_greedy
from nanokv.kernels.quant import dequantize_tokens
from nanokv.kernels.reference import attention_by_position, quantized_decode_attention
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.cache.quant_pool import QuantizedBlockPool, QuantSpec


def fake_quant(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """x quantized and read back, written out independently of nanokv/kernels/quant.py: each run of
    `group` entries along `dim` gets the grid min + k * (max - min) / (2^bits - 1), its scale and
    min rounded to float16 as stored."""
    x = x.float().movedim(dim, -1)
    g = x.unflatten(-1, (-1, group))
    low = g.amin(-1, keepdim=True).half().float()
    scale = ((g.amax(-1, keepdim=True) - low) / (2 ** bits - 1)).half().float()
    codes = torch.where(scale > 0, ((g - low) / torch.where(scale > 0, scale, 1)).round(), 0).clamp(0, 2 ** bits - 1)
    return (codes * scale + low).flatten(-2).movedim(-1, dim)


def tiny_config(layers=2, heads=2, head_dim=64):
    """What a cache reads from a model's config."""
    return SimpleNamespace(num_layers=layers, num_kv_heads=heads, head_dim=head_dim)


@pytest.mark.parametrize("bits,per_channel,dtype,expected", [
    (4, True, torch.bfloat16, (10240, 39)),   # 128 tokens: 2 x 4096 codes + 4 x 512 scales / zeros
    (2, True, torch.bfloat16, (6144, 23)),
    (4, False, torch.float32, (2560, 4)),     # 32 tokens per token-keys block
])
def test_unit_bytes_and_residual_block_size(bits, per_channel, dtype, expected):
    spec = QuantSpec(bits, per_channel, 32, 128 if per_channel else 32)
    assert (spec.unit_bytes(64), spec.full_block_size(64, dtype)) == expected
    per_token = 2 * 64 * dtype.itemsize + 4
    assert spec.full_block_size(64, dtype) * per_token <= spec.unit_bytes(64)  # a residual block fits a row
    assert (spec.full_block_size(64, dtype) + 1) * per_token > spec.unit_bytes(64)  # and is the largest that does


def test_every_field_of_both_kinds_is_a_separate_byte_range_of_one_row():
    pool = QuantizedBlockPool(6, QuantSpec(4, True), 64, torch.bfloat16)
    ranges = []
    for f in [*pool.fields.values(), *pool.qfields.values()]:
        assert f.shape[0] == 6 and f.stride(0) * f.element_size() == pool.unit_bytes
        start = f.data_ptr() - pool.arena.data_ptr()
        ranges.append((start, start + f[0].numel() * f.element_size()))
    for group in (ranges[:3], ranges[3:]):  # full-precision fields, then quantized fields: disjoint
        group = sorted(group)
        assert all(a[1] <= b[0] for a, b in zip(group, group[1:])) and group[-1][1] <= pool.unit_bytes
    assert pool.num_free == 5 and 0 not in pool.allocate(5).tolist()  # block 0 is never handed out
    assert pool.arena[0].count_nonzero() == 0


def cache_with(spec, layers=2, heads=2, blocks=400, dtype=torch.float32):
    cfg = tiny_config(layers, heads)
    return QuantizedKVCache.from_memory(cfg, blocks * spec.unit_bytes(64), spec, dtype), cfg


def test_settle_quantizes_full_residuals_and_frees_their_blocks():
    spec = QuantSpec(4, True, 32, 128)
    cache, cfg = cache_with(spec)
    gen = torch.Generator().manual_seed(0)
    cache.add(7)
    n = 300
    k, v = torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)
    for layer in range(2):
        slots = cache.append_slots(7, n, layers=slice(layer, layer + 1))[0]
        cache.write(slots, k, v, torch.arange(n))
    before = cache.pool.num_free
    cache.settle(7)
    s = cache.seqs[7]
    bs = cache.block_size                                             # 19 tokens (float32)
    assert s.num_cold.tolist() == [[2, 2], [2, 2]] and s.lengths.tolist() == [[44, 44], [44, 44]]
    assert s.num_blocks.tolist() == [[3, 3]] * 2                      # ceil(44 / 19)
    # each head: 16 residual blocks -> 2 quantized + 3 residual
    assert cache.pool.num_free == before + 4 * (math.ceil(n / bs) - 5)
    assert cache.seq_bytes(7) == 4 * 5 * spec.unit_bytes(64)
    assert cache.theoretical_bytes(7) == 4 * (2 * spec.quantized_bytes(64) + 44 * (2 * 64 * 4 + 4))
    # what the blocks hold: the first 256 tokens quantized, the rest exact, in order
    pool = cache.pool
    for layer in range(2):
        for head in range(2):
            qb = s.cold_tables[layer, head, :2]
            keys = dequantize_tokens(pool.qfields["k_codes"][qb], pool.qfields["k_scale"][qb],
                                     pool.qfields["k_zero"][qb], 4, 32, True).reshape(256, 64)
            values = dequantize_tokens(pool.qfields["v_codes"][qb], pool.qfields["v_scale"][qb],
                                       pool.qfields["v_zero"][qb], 4, 32, False).reshape(256, 64)
            assert torch.allclose(keys, fake_quant(k[:256, head], 4, 32, dim=0), atol=1e-5)
            assert torch.allclose(values, fake_quant(v[:256, head], 4, 32, dim=1), atol=1e-5)
            rest = s.tables[layer, head, :3]
            assert torch.equal(pool.fields["k"][rest].reshape(-1, 64)[:44], k[256:, head])
            assert pool.fields["pos"][rest].reshape(-1)[:44].tolist() == list(range(256, 300))
    # both tiers' tables are mirrored on the device, at one row
    check_mirrors(cache)
    cache.free(7)
    assert cache.pool.num_free == cache.pool.usable_blocks
    check_mirrors(cache)


def check_mirrors(cache):
    """Each tier's device mirror holds its host tables in the sequence's row, -1 elsewhere."""
    for mirror, tables, held in ((cache.mirror, "tables", "num_blocks"), (cache.cold_mirror, "cold_tables", "num_cold")):
        mirror.sync()
        expected = torch.full_like(mirror.tables, -1)
        for seq_id, s in cache.seqs.items():
            t, n = getattr(s, tables), getattr(s, held)
            width = min(t.shape[-1], mirror.tables.shape[-1])
            expected[:, mirror.rows[seq_id], :, :width] = torch.where(torch.arange(t.shape[-1]) < n[..., None], t, -1)[..., :width]
        assert torch.equal(mirror.tables, expected)
    assert cache.mirror.rows == cache.cold_mirror.rows


def test_decode_attention_over_quantized_blocks_and_residual_is_attention_over_their_values():
    spec = QuantSpec(2, True, 32, 64)
    cache, cfg = cache_with(spec, layers=1, heads=2)
    gen = torch.Generator().manual_seed(1)
    lengths = [150, 70]
    k = [torch.randn(n, 2, 64, generator=gen) for n in lengths]
    v = [torch.randn(n, 2, 64, generator=gen) for n in lengths]
    for i, n in enumerate(lengths):
        cache.add(i)
        cache.write(cache.append_slots(i, n)[0], k[i], v[i], torch.arange(n))
        cache.settle(i)
    q = torch.randn(2, 6, 64, generator=gen)  # GQA: 3 query heads per kv-head
    seqs = [cache.seqs[i] for i in range(2)]
    pad = lambda t, w: torch.nn.functional.pad(t, (0, w - t.shape[-1]), value=-1)  # noqa: E731
    qtables = torch.stack([pad(s.cold_tables[0], 4) for s in seqs])
    tables = torch.stack([pad(s.tables[0], 8) for s in seqs])
    out = quantized_decode_attention(q, torch.tensor([149, 69]), cache.pool.quant_blocks(0), qtables,
                                     torch.stack([s.num_cold[0] * 64 for s in seqs]), cache.pool.k, cache.pool.v,
                                     cache.pool.pos, tables, torch.stack([s.lengths[0] for s in seqs]))
    for i, n in enumerate(lengths):
        cut = n // 64 * 64
        keys = torch.cat([fake_quant(k[i][:cut], 2, 32, dim=0), k[i][cut:]])
        values = torch.cat([fake_quant(v[i][:cut], 2, 32, dim=2), v[i][cut:]])
        expected = attention_by_position(q[i:i + 1], keys, values, torch.tensor([n - 1]), torch.arange(n))
        assert torch.allclose(out[i], expected[0], atol=1e-5)


class DenseQuantized:
    """A plain statement of the quantized cache, as the model's attention callable: per layer
    a list of (dequantized) quantized K/V and the full-precision residual; prefill attends in
    full precision and then quantizes every whole `residual` tokens of the prompt; each decode
    token attends over both and, once the residual holds `residual` tokens, they are quantized."""

    def __init__(self, bits, group, residual, keys_per_channel):
        self.bits, self.group, self.residual, self.per_channel = bits, group, residual, keys_per_channel
        self.layers = {}

    def __call__(self, layer, q, k, v, sliding_window):
        kq, vq, kf, vf = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0]))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        keys, values = torch.cat([kq, kf]), torch.cat([vq, vf])
        n = len(keys)
        out = attention_by_position(q, keys, values, self.positions, torch.arange(n))
        cut = len(kf) // self.residual * self.residual
        if cut:
            kdim = 0 if self.per_channel else 2
            kq = torch.cat([kq, torch.cat([fake_quant(kf[s:s + self.residual], self.bits, self.group, kdim)
                                           for s in range(0, cut, self.residual)])])
            vq = torch.cat([vq, fake_quant(vf[:cut], self.bits, self.group, 2)])
            kf, vf = kf[cut:], vf[cut:]
        self.layers[layer] = (kq, vq, kf, vf)
        return out


@pytest.mark.parametrize("method,options,spec", [
    ("kivi", {"bits": 2}, (2, 32, 128, True)),
    ("int4", {}, (4, 32, 32, False)),
])
@pytest.mark.slow
def test_engine_matches_a_plain_statement_of_the_quantized_cache(smollm2_gguf, method, options, spec):
    """Greedy tokens and final logits through the engine (packed blocks, residual blocks, flushes
    in settle, quantized decode attention) and through DenseQuantized, across two flushes."""
    from nanokv import LLM, SamplingParams

    prompt, steps = list(range(1000, 1200)), 70   # 200 tokens: flushes at prefill and during decode
    llm = LLM(str(smollm2_gguf), dtype="float32", method=method, **options)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    reference = DenseQuantized(*spec)
    tokens = restated_greedy(llm.model, reference, prompt, steps)
    assert out.token_ids == tokens
    # every cached token is held once, in a quantized block or in the residual
    held = out.metrics["kv_cache_tokens"]
    R = spec[2]
    assert out.metrics["kv_cache_bytes_theory"] == 30 * 3 * (
        held // R * llm.cache.spec.quantized_bytes(64) + held % R * (2 * 64 * 4 + 4))


@pytest.mark.slow
def test_eviction_then_quantization_keeps_the_same_tokens_in_fewer_bytes(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    prompt, held = list(range(2000, 2300)), {}
    for method, options in (("snapkv", {}), ("snapkv+kivi", {"bits": 4})):
        llm = LLM(str(smollm2_gguf), dtype="float32", method=method, compression=0.5, window_size=8, **options)
        finish = llm.scheduler.finish

        def capture(seq, llm=llm, finish=finish, method=method):
            s = llm.cache.seqs[seq.id]
            quantized = llm.cache.quantized_lengths(seq.id) if method != "snapkv" else 0
            held[method] = (s.lengths + quantized, s.lengths.clone())
            finish(seq)

        llm.scheduler.finish = capture
        [out] = llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        held[method] += (out.metrics["kv_cache_bytes"],)
    tokens, _, full_bytes = held["snapkv"]
    quant_tokens, residual, quant_bytes = held["snapkv+kivi"]
    assert torch.equal(tokens, quant_tokens) and (tokens == 150).all()  # snapkv keeps 150 of 300
    assert (residual == 150 - 128).all()                                # one block quantized
    assert quant_bytes < full_bytes / 2


@pytest.mark.slow
def test_a_quantized_cache_preempts_and_recomputes_without_losing_a_request(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    spec = QuantSpec(4, True, 32, 128)
    # 100-token prompts are admitted holding 7 residual blocks a head (float32: 16 tokens each);
    # by 256 tokens they hold a quantized block and 8 residual ones: four cannot all stay
    memory = 1 + 30 * 3 * 24 * spec.unit_bytes(64)
    llm = LLM(str(smollm2_gguf), dtype="float32", method="kivi", bits=4, kv_cache_memory=memory)
    prompts = [list(range(100 + i, 200 + i)) for i in range(4)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=160, ignore_eos=True))
    assert all(len(o.token_ids) == 160 for o in outs)
    assert llm.stats["preemptions"] > 0
    assert llm.cache.pool.num_free == llm.cache.pool.usable_blocks  # everything came back
