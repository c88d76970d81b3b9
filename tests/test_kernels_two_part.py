"""kernels.two_part_decode against its twins: ThinK's slim-key decode (reference.pruned_attention)
in a real PrunedBlockPool, whose slim and full blocks are strided views of one byte arena, and
MiniCache's merged-pair decode (reference.paired_attention) with magnitudes as slot fields; under
the Triton interpreter on CPU, compiled on a CUDA GPU (`triton_device`).

Unused slots hold large finite garbage at position 0 (visible, were a length mask to fail), a
merged layer's slots of magnitude 0 hold garbage too (visible, were the magnitude mask to fail),
and each head's parts differ in length, one of them sometimes empty."""

import math

import pytest
import torch

from nanokv.cache.pool import BlockPool
from nanokv.cache.pruned_cache import PrunedBlockPool
from nanokv.kernels import reference
from nanokv.kernels.two_part_decode import paired_decode_attention, pruned_decode_attention

GARBAGE = 1e4  # large but finite in float16


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def scatter(gen, fields, block_size, free, lengths, d_k, d_v, positions):
    """Write each head's tokens (lengths [B][H]) into blocks taken from `free`, through the
    fields {"k": [N, bs, d_k], "v": [N, bs, d_v], "pos": [N, bs]}; positions(b, h, n) -> [n] sorted.
    -> tables [B, H, nb] (-1 past a head's blocks, one spare column) and the written tokens."""
    B, H = len(lengths), len(lengths[0])
    nb = max(1, max(math.ceil(n / block_size) for row in lengths for n in row))
    tables = torch.full((B, H, nb + 1), -1, dtype=torch.int64)
    for b, row in enumerate(lengths):
        for h, n in enumerate(row):
            k, v, pos = torch.randn(n, d_k, generator=gen), torch.randn(n, d_v, generator=gen), positions(b, h, n)
            for j in range(math.ceil(n / block_size)):
                block, part = free.pop(), slice(j * block_size, (j + 1) * block_size)
                tables[b, h, j] = block
                m = len(pos[part])
                for name, value in (("k", k[part]), ("v", v[part]), ("pos", pos[part])):
                    fields[name][block, :m] = value.to(fields[name].dtype)
    return tables


def later_positions(gen, n, start, end_inclusive):
    """n sorted distinct positions in [start, end_inclusive]."""
    choice = torch.randperm(end_inclusive - start + 1, generator=gen)[:n] + start
    return choice.sort().values


PRUNED_CASES = [  # group, d, kD, block_size, dtype, window, blocks_per_split, slim lengths, full lengths [B][Hkv=2]
    (1, 64, 32, 4, torch.float32, None, 1, [[9, 0], [20, 5]], [[1, 7], [3, 12]]),
    (3, 128, 48, 16, torch.float16, 6, None, [[40, 17], [2, 33]], [[5, 1], [18, 9]]),
    (4, 64, 20, 4, torch.float32, 9, 2, [[13, 31], [0, 6]], [[4, 2], [1, 11]]),
    (8, 64, 32, 16, torch.float16, None, 1, [[50, 3]], [[17, 2]]),
]


@pytest.mark.parametrize("group,d,kD,block_size,dtype,window,blocks_per_split,slim_lengths,lengths", PRUNED_CASES)
def test_pruned_decode_matches_reference(group, d, kD, block_size, dtype, window, blocks_per_split, slim_lengths,
                                         lengths, triton_device):
    gen = torch.Generator().manual_seed(group * 100 + d + kD)
    B, Hkv = len(lengths), 2
    pool = PrunedBlockPool(2 + 2 * B * Hkv * 8, block_size, d, kD, dtype, triton_device)
    for fields in (pool.fields, pool.slim_fields):
        fields["k"].fill_(GARBAGE)
        fields["v"].fill_(-GARBAGE)
        fields["pos"].zero_()
    free = (1 + torch.randperm(pool.num_blocks - 1, generator=gen)).tolist()
    n_slim = pool.slim_block_size
    assert n_slim > block_size, "slim blocks hold more tokens than full ones"
    q_pos = torch.tensor([max(s + f for s, f in zip(srow, frow)) + 5 for srow, frow in zip(slim_lengths, lengths)])
    # slim tokens are a head's oldest; full ones the latest, ending at q_pos
    stables = scatter(gen, pool.slim_fields, n_slim, free, slim_lengths, kD, d,
                      lambda b, h, n: later_positions(gen, n, 0, int(q_pos[b]) - lengths[b][h] - 1))
    tables = scatter(gen, pool.fields, block_size, free, lengths, d, d,
                     lambda b, h, n: torch.cat([later_positions(gen, n - 1, int(q_pos[b]) - n, int(q_pos[b]) - 1),
                                                q_pos[b:b + 1]]))
    channels = torch.stack([torch.stack([torch.randperm(d, generator=gen)[:kD] for _ in range(Hkv)])
                            for _ in range(B)])
    q = torch.randn(B, Hkv * group, d, generator=gen).to(dtype)
    # the pools' own strided views on the device; the rest moved there
    slim, full = tuple(pool.slim_fields[name] for name in ("k", "v", "pos")), (pool.k, pool.v, pool.pos)
    q, q_pos, stables, slim_len, channels, tables, full_len = (t.to(triton_device) for t in (
        q, q_pos, stables, torch.tensor(slim_lengths), channels, tables, torch.tensor(lengths)))
    out = pruned_decode_attention(q, q_pos, *slim, stables, slim_len, channels, *full, tables, full_len, window,
                                  blocks_per_split=blocks_per_split)
    ref = reference.pruned_attention(q.float()[:, None], q_pos[:, None], *slim, stables, slim_len, channels, *full,
                                     tables, full_len, window)[:, 0]
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 2e-3)


PAIRED_CASES = [  # group, d, block_size, dtype, window, blocks_per_split, layer a's lengths, b's lengths [B][H=2]
    (1, 64, 4, torch.float32, None, 1, [[9, 14], [20, 5]], [[1, 7], [3, 12]]),
    (3, 128, 16, torch.float16, 7, None, [[40, 17], [2, 33]], [[5, 1], [18, 9]]),
    (4, 64, 4, torch.float32, 5, 2, [[13, 31], [1, 6]], [[4, 2], [1, 11]]),
]


@pytest.mark.parametrize("group,d,block_size,dtype,window,blocks_per_split,lengths_a,lengths_b", PAIRED_CASES)
def test_paired_decode_matches_reference(group, d, block_size, dtype, window, blocks_per_split, lengths_a, lengths_b,
                                         triton_device):
    gen = torch.Generator().manual_seed(group * 100 + d + block_size)
    B, H = len(lengths_a), 2
    pool = BlockPool(1 + 2 * B * H * 12, block_size, d, dtype, triton_device,
                     extra_fields={"k_mag": torch.float32, "v_mag": torch.float32})
    pool.k.fill_(GARBAGE)
    pool.v.fill_(-GARBAGE)
    free = (1 + torch.randperm(pool.num_blocks - 1, generator=gen)).tolist()
    q_pos = torch.tensor([max(a + b for a, b in zip(ra, rb)) + 3 for ra, rb in zip(lengths_a, lengths_b)])
    # layer a: the prompt, its merged tokens carrying b's magnitudes, the rest (magnitude 0) a's alone
    tables_a = scatter(gen, pool.fields, block_size, free, lengths_a, d, d,
                       lambda b, h, n: later_positions(gen, n, 0, int(q_pos[b]) - 1))
    for b, row in enumerate(lengths_a):
        for h, n in enumerate(row):
            slots = [(int(tables_a[b, h, i // block_size]), i % block_size) for i in range(n)]
            merged = torch.rand(n, generator=gen) < 0.7
            merged[0] = True  # every head sees at least one merged slot
            for (block, offset), m in zip(slots, merged):
                pool.fields["k_mag"][block, offset] = float(torch.rand(1, generator=gen)) * 4 + 0.5 if m else 0.0
                pool.fields["v_mag"][block, offset] = float(torch.rand(1, generator=gen)) * 4 if m else 0.0
                if not m:  # a's own token: never read by b, whatever it holds
                    pool.k[block, offset], pool.v[block, offset] = GARBAGE, -GARBAGE
    # layer b: its retained tokens and the decoded ones, ending at q_pos
    tables_b = scatter(gen, pool.fields, block_size, free, lengths_b, d, d,
                       lambda b, h, n: torch.cat([later_positions(gen, n - 1, 0, int(q_pos[b]) - 1),
                                                  q_pos[b:b + 1]]))
    q = torch.randn(B, H * group, d, generator=gen).to(dtype)
    fields = (pool.k, pool.v, pool.pos, pool.fields["k_mag"], pool.fields["v_mag"])
    q, q_pos, tables_a, len_a, tables_b, len_b = (t.to(triton_device) for t in (
        q, q_pos, tables_a, torch.tensor(lengths_a), tables_b, torch.tensor(lengths_b)))
    out = paired_decode_attention(q, q_pos, *fields, tables_a, len_a, tables_b, len_b, window,
                                  blocks_per_split=blocks_per_split)
    ref = reference.paired_attention(q.float()[:, None], q_pos[:, None], *fields, tables_a, len_a, tables_b, len_b,
                                     window)[:, 0]
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 2e-3)
