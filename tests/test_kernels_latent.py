"""kernels.latent_decode against kernels.reference.latent_attention, under the Triton interpreter
on CPU or compiled on a CUDA GPU (`triton_device`), and the latent cache's attention through either
against dense attention over what went in, at full rank.

Shapes are tiny (the interpreter runs each program in numpy): a handful of cases that together
cover GQA ratios 1, 3, 4, head dims 64 and 128, head groups of 1 and 2 kv-heads, ranks that fill
1, 2, 3 and 4 slots a token (r_k not a multiple of 16, a K latent wider than one key tile), block
sizes 4 and 16 (tokens straddling blocks), float32 and float16, windows, ragged lengths and split
counts."""

import math
from types import SimpleNamespace

import pytest
import torch

from nanokv.cache.latent_cache import CHUNK, LatentKVCache, LatentLayer
from nanokv.kernels.latent_decode import latent_decode_attention
from nanokv.kernels.reference import latent_attention
from nanokv.models.rope import inverse_frequencies, rope_cos_sin

GARBAGE = 1e4  # large but finite (fits float16): what a stale slot, or a token's chunk padding, may hold
GROUPS = 2  # head groups of a layer


def orthonormal(gen, *shape):
    return torch.linalg.qr(torch.randn(*shape, generator=gen))[0]


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def latent_inputs(seed, tokens, group, d, heads_per_group, ranks, block_size, dtype):
    """Random decode inputs over a latent pool laid out as LatentKVCache stores it: tokens [B] per
    sequence (every head group holds them all), scattered slot by slot into randomly permuted blocks
    whose unwritten slots, and each token's chunk padding past r_k + r_v, hold GARBAGE (unwritten
    slots at position 0, which every query would see if the length mask failed). Each sequence
    keeps a random sorted subset of its positions plus the current token q_pos, and sometimes a
    future position. -> (q, q_pos, then latent_attention's arguments after them)."""
    gen = torch.Generator().manual_seed(seed)
    r_k, r_v = ranks
    m = -(-(r_k + r_v) // (2 * CHUNK))
    B, H = len(tokens), GROUPS * heads_per_group
    nb = max(math.ceil(n * m / block_size) for n in tokens)
    num_blocks = B * GROUPS * nb + 3  # some blocks stay unused
    k_pool = torch.full((num_blocks, block_size, CHUNK), GARBAGE)
    v_pool = torch.full((num_blocks, block_size, CHUNK), -GARBAGE)
    pos_pool = torch.zeros(num_blocks, block_size, dtype=torch.int32)
    tables = torch.full((B, GROUPS, nb), -1, dtype=torch.int64)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    q_pos = torch.zeros(B, dtype=torch.int64)
    for b, n in enumerate(tokens):
        q_pos[b] = n + int(torch.randint(0, 20, (1,), generator=gen))
        others = torch.randperm(int(q_pos[b]) + 2, generator=gen)
        pos = torch.cat([others[others != q_pos[b]][:n - 1], q_pos[b:b + 1]]).sort().values
        for g in range(GROUPS):
            latent = torch.full((n, 2 * m * CHUNK), GARBAGE)
            latent[:, :r_k + r_v] = 3 * torch.randn(n, r_k + r_v, generator=gen)
            chunks = latent.view(n * m, 2, CHUNK)  # slot token * m + j: chunks 2j (k field), 2j + 1 (v field)
            for j in range(math.ceil(n * m / block_size)):
                block = order.pop()
                tables[b, g, j] = block
                part = slice(j * block_size, (j + 1) * block_size)
                used = len(chunks[part])
                k_pool[block, :used], v_pool[block, :used] = chunks[part, 0], chunks[part, 1]
                pos_pool[block, :used] = pos.repeat_interleave(m)[part]
    k_basis = orthonormal(gen, GROUPS, heads_per_group * d, r_k)
    k_bias = torch.randn(GROUPS, heads_per_group * d, generator=gen)
    cos, sin = rope_cos_sin(torch.arange(int(q_pos.max()) + 3), inverse_frequencies(d, 10000.0, {}), torch.float32)
    lengths = torch.tensor(tokens)[:, None].expand(B, GROUPS) * m
    q = torch.randn(B, H * group, d, generator=gen)
    return (q.to(dtype), q_pos, k_pool.to(dtype), v_pool.to(dtype), pos_pool, tables, lengths, m, k_basis, k_bias,
            ranks, cos, sin)


def twin(args, window=None):
    """reference.latent_attention for one query a sequence, from the same values in float32."""
    q, q_pos, k_pool, v_pool, *rest = args
    return latent_attention(q.float()[:, None], q_pos[:, None], k_pool.float(), v_pool.float(), *rest,
                            sliding_window=window)[:, 0]


CASES = [  # group, d, heads a group, ranks, block_size, dtype, window, blocks_per_split, tokens [B]
    (1, 64, 1, (24, 40), 4, torch.float32, None, 1, [1, 7, 13]),          # m = 2, a split per block
    (3, 128, 2, (64, 64), 16, torch.float16, 5, None, [1, 20]),           # m = 4, one split (default)
    (4, 64, 2, (8, 16), 4, torch.float32, 7, 1, [9, 1, 17]),              # m = 1, empty splits
    (3, 64, 1, (40, 40), 16, torch.float16, None, 2, [12, 23]),           # m = 3: tokens straddle blocks
    (4, 128, 2, (24, 40), 16, torch.float32, 3, 1, [30, 2]),              # window hides whole splits
    (1, 64, 2, (72, 40), 4, torch.float16, 9, 3, [26, 5]),                # K latent in 2 tiles, m = 4
]


@pytest.mark.parametrize("group,d,heads_per_group,ranks,block_size,dtype,window,blocks_per_split,tokens", CASES)
def test_latent_decode_matches_twin(group, d, heads_per_group, ranks, block_size, dtype, window, blocks_per_split,
                                    tokens, triton_device):
    args = [t.to(triton_device) if isinstance(t, torch.Tensor) else t for t in latent_inputs(
        group * 100 + d + block_size, tokens, group, d, heads_per_group, ranks, block_size, dtype)]
    assert len(set(tokens)) > 1, "sequences of different lengths"
    out = latent_decode_attention(*args, sliding_window=window, blocks_per_split=blocks_per_split)
    B, Hq, _ = args[0].shape
    assert out.shape == (B, Hq, ranks[1]) and out.dtype == dtype
    # outputs and scratch start as NaN: anything the kernels failed to write would show here
    assert torch.isfinite(out).all()
    assert rel_err(out, twin(args, window)) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_splits_agree_and_hidden_latents_do_not_leak():
    """One split and a split per block give the same output, and rewriting the latents the mask
    hides (past the length, outside the window, in the future, unused blocks, a visible token's
    chunk padding) changes nothing."""
    args = latent_inputs(7, [21, 6], 4, 64, 2, (40, 40), 4, torch.float32)  # m = 3: 16 channels of padding
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, m = args[:8]
    one = latent_decode_attention(*args, sliding_window=6, blocks_per_split=100)
    many = latent_decode_attention(*args, sliding_window=6, blocks_per_split=1)
    assert rel_err(many, one) < 1e-6
    slots = (tables.clamp(min=0)[..., None] * 4 + torch.arange(4)).flatten(2)        # [B, G, S] flat slots
    index = torch.arange(slots.shape[-1])
    pos, q_pos3 = pos_pool.flatten()[slots], q_pos[:, None, None]
    visible = (index < lengths[..., None]) & (pos <= q_pos3) & (q_pos3 - pos < 6)
    stale = torch.ones(k_pool.numel() // CHUNK, dtype=torch.bool)
    stale[slots[visible]] = False
    assert stale[slots[index < lengths[..., None]]].any(), "some held tokens should be hidden"
    padding = slots[visible & (index % m == m - 1)]  # chunk 5 of 6: a token's last v field
    assert padding.numel()
    k2, v2 = k_pool.clone().view(-1, CHUNK), v_pool.clone().view(-1, CHUNK)
    k2[stale], v2[stale], v2[padding] = 3e3, -5e3, 7e3
    again = latent_decode_attention(q, q_pos, k2.view_as(k_pool), v2.view_as(v_pool), *args[4:], sliding_window=6,
                                    blocks_per_split=1)
    torch.testing.assert_close(again, many, rtol=0, atol=0)


def test_tensor_core_path(monkeypatch):
    """The path a GPU takes for a half-precision cache (latent tiles and key basis in float16,
    tl.dot with float32 accumulators), run by the interpreter in float16, the one half precision
    whose dots it gets right: the twin's answer, tiles spanning several blocks."""
    import nanokv.kernels.latent_decode as latent_decode

    monkeypatch.setattr(latent_decode, "exact_dots", lambda dtype: False)
    args = latent_inputs(3, [40, 5], 3, 64, 2, (24, 40), 4, torch.float16)
    out = latent_decode.latent_decode_attention(*args, sliding_window=30, blocks_per_split=16)
    assert torch.isfinite(out).all()
    assert rel_err(out, twin(args, 30)) < 2e-3


def store_tokens(cache, seq_id, k, v, positions):
    cache.add(seq_id)
    for layer in range(len(cache.layers)):
        slots = cache.append_slots(seq_id, len(k), layers=slice(layer, layer + 1))[0]
        cache.store(layer, slots, k, v, positions)


@pytest.mark.parametrize("choice", ["reference", "triton"])
@pytest.mark.parametrize("T,window,group", [(1, None, 2), (1, 9, 1), (4, 5, 2)])
def test_full_rank_latents_attend_as_the_keys_and_values_they_hold(choice, T, window, group):
    """At full rank a latent cache loses nothing: its attention (the kernel or its twin, then the
    value basis) over sequences stored through the cache is attention_by_position over the keys
    and values that went in, for layers whose tokens take 2 and 4 slots, in head groups of 1 and 2
    (T > 1: a prefill, which the twin serves under either choice)."""
    from nanokv.kernels import kernels_for
    from nanokv.kernels.reference import attention_by_position

    gen = torch.Generator().manual_seed(1)
    cfg = SimpleNamespace(num_layers=2, num_kv_heads=4, head_dim=32)
    G, gd = 4 // group, 32 * group
    inv_freq = inverse_frequencies(32, 10000.0, {})
    layers = [LatentLayer(orthonormal(gen, G, gd, gd), orthonormal(gen, G, gd, gd), torch.randn(G, gd, generator=gen),
                          torch.randn(G, gd, generator=gen))]
    layers.append(LatentLayer(layers[0].k_basis[..., :24], layers[0].v_basis[..., :40], layers[0].k_bias,
                              layers[0].v_bias))
    cache = LatentKVCache.from_memory(cfg, 1 << 20, layers, group, inv_freq, 4, torch.float32)
    cache.kernels = kernels_for("cpu", choice)
    assert cache.slots_per_token.tolist() == [2 * group, 2]
    held = {}
    for seq_id, n in ((0, 11), (1, 3)):
        k, v = 3 * torch.randn(n, 4, 32, generator=gen), torch.randn(n, 4, 32, generator=gen)
        positions = torch.arange(n) * 3 + seq_id  # gaps: positions are data
        store_tokens(cache, seq_id, k, v, positions)
        held[seq_id] = k, v, positions
    [group] = cache.decode_groups([0, 1], whole_batch=True)
    cache.mirror.sync()
    _, tables, lengths = cache.device_group(group, group.host)
    q = torch.randn(2, T, 8, 32, generator=gen)
    q_pos = torch.tensor([30, 6])[:, None] - torch.arange(T).flip(0)
    out = cache._attend(0, q, q_pos, tables[0], lengths[0], window)
    assert out.shape == (2, T, 8, 32)
    for b, (k, v, positions) in held.items():
        expected = attention_by_position(q[b], k, v, q_pos[b], positions, window)
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)
    low = cache._attend(1, q, q_pos, tables[1], lengths[1], window)  # rank 24 / 40 of 64: not lossless
    assert (low - out).abs().max() > 1e-3
