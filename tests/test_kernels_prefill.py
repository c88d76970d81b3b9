"""The Triton prefill kernel (nanokv/kernels/prefill.py) against the plain-torch reference, under the
Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).

Each case launches several sequences at once, with ragged query lengths, over a paged cache laid
out as after compaction: every (sequence, kv-head) holds its own keys, values and positions in
randomly permuted blocks, unused slots may hold large finite garbage, and the output is poisoned
with NaN first so a row the kernel skips cannot pass. Shapes are tiny: the interpreter is slow.
"""

import math

import pytest
import torch

from helpers import paged_layout
from nanokv.kernels.prefill import prefill_attention, query_tiles
from nanokv.kernels.reference import paged_attention


def make_batch(gen, seqs, num_kv_heads, group, d, block_size, dtype, garbage):
    """seqs: (first position, cached prefix tokens, new tokens, compressed) per sequence. The new
    chunk is in the cache already, after the prefix; a compressed prefix keeps a different random
    subset of positions in each head, of a different size (so heads differ in length)."""
    heads, q_pos = [], []
    for first, prefix, new, compressed in seqs:
        row = []
        for h in range(num_kv_heads):
            keep = torch.ones(prefix + new, dtype=torch.bool)
            if compressed:  # head h keeps a random (h + 1) / (Hkv + 1) of the prefix
                keep[:prefix] = False
                keep[torch.randperm(prefix, generator=gen)[:prefix * (h + 1) // (num_kv_heads + 1)]] = True
            pos = (first + torch.nonzero(keep).flatten()).to(torch.int32)
            row.append((torch.randn(len(pos), d, generator=gen), torch.randn(len(pos), d, generator=gen), pos))
        heads.append(row)
        q_pos.append(torch.arange(first + prefix, first + prefix + new))
    num_blocks = sum(math.ceil(len(p) / block_size) for row in heads for _, _, p in row) + 5  # 5 stay unused
    # a spare -1 column in every table: entries past a head's blocks must never be read
    k_pool, v_pool, pos_pool, tables, lengths = paged_layout(gen, heads, num_blocks, block_size, d, garbage,
                                                             dtype, spare_columns=1)
    q_pos = torch.cat(q_pos)
    q = torch.randn(len(q_pos), num_kv_heads * group, d, generator=gen).to(dtype)
    cu_seqlens = torch.tensor([0] + [new for *_, new, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths


# Together the cases cover: GQA 1, 3, 4, 8; D 64, 128; block sizes 4, 16; float32, float16;
# window on and off; garbage on and off; query lengths 1, non-multiples of the block size, and more
# than one query tile; no prefix, a full cached prefix, and compressed prefixes (heads of
# different lengths); positions not starting at 0; an empty sequence in the batch; query tiles
# of 16 rows and of the default 64. (bfloat16 too: what the engine's models run in.)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [
    # group, kv-heads, D, block, dtype, window, garbage, block_m, seqs (first pos, prefix, new, compressed)
    (1, 2, 64, 4, torch.float32, None, True, 16, [(0, 0, 1), (0, 0, 7), (3, 6, 18)]),
    (3, 2, 128, 16, torch.float16, 5, False, 16, [(0, 13, 9), (2, 0, 1), (0, 21, 17, True)]),
    (4, 2, 64, 16, torch.float32, 7, True, 64, [(5, 20, 11, True), (0, 0, 0), (0, 3, 1, True)]),
    (8, 2, 128, 4, torch.float16, None, True, 16, [(0, 9, 6, True), (1, 0, 3), (0, 17, 1)]),
    (2, 2, 64, 8, torch.bfloat16, 6, True, 16, [(0, 12, 19, True), (0, 0, 5)]),
]


@pytest.mark.parametrize("group, num_kv_heads, d, block_size, dtype, window, garbage, block_m, seqs", CASES)
def test_prefill_matches_reference(group, num_kv_heads, d, block_size, dtype, window, garbage, block_m, seqs,
                                   triton_device):
    gen = torch.Generator().manual_seed(group * 1000 + d + block_size)
    seqs = [s if len(s) == 4 else (*s, False) for s in seqs]
    q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths = (t.to(triton_device) for t in make_batch(
        gen, seqs, num_kv_heads, group, d, block_size, dtype, garbage))
    if any(s[3] for s in seqs):
        assert (lengths[:, :1] != lengths).any(), "a compressed prefix should give heads different lengths"
    out = torch.full_like(q, float("nan"))  # any row the kernel does not write stays NaN
    result = prefill_attention(q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths, window, out=out,
                               block_m=block_m)
    assert result is out and out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    # the reference in float32 from the same (possibly float16) inputs
    k32, v32, q32 = k_pool.float(), v_pool.float(), q.float()
    for b in range(len(seqs)):
        s, e = int(cu[b]), int(cu[b + 1])
        if s == e:
            continue
        ref = paged_attention(q32[s:e][None], q_pos[s:e][None], k32, v32, pos_pool, tables[b:b + 1],
                              lengths[b:b + 1], window)[0]
        err = (out[s:e].float() - ref).abs().max() / ref.abs().max()
        assert err < tol, (b, err.item())


@pytest.mark.parametrize("window, obs_window", [(None, 3), (4, 18), (None, 100)])
def test_observation_column_sums_match_reference_probs(window, obs_window, triton_device):
    """obs_window W: per slot, the probability it received summed over each sequence's last W
    queries (W = 18 spans two 16-row tiles, so they add into the same columns; 100 > every chunk:
    all queries)."""
    gen = torch.Generator().manual_seed(obs_window)
    group, num_kv_heads, block_size = 2, 2, 4
    q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths = (t.to(triton_device) for t in make_batch(
        gen, [(0, 10, 20, True), (0, 0, 1, False), (2, 5, 7, False)], num_kv_heads, group, 64, block_size,
        torch.float32, True))
    out, sums = prefill_attention(q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths, window,
                                  obs_window=obs_window, block_m=16)
    assert sums.shape == (3, num_kv_heads * group, tables.shape[2] * block_size) and sums.dtype == torch.float32
    for b in range(3):
        s, e = int(cu[b]), int(cu[b + 1])
        ref, probs = paged_attention(q[s:e][None], q_pos[s:e][None], k_pool, v_pool, pos_pool, tables[b:b + 1],
                                     lengths[b:b + 1], window, return_probs=True)
        torch.testing.assert_close(out[s:e], ref[0], rtol=1e-5, atol=1e-5)
        expected = probs[0, :, :, -obs_window:].sum(dim=2).flatten(0, 1)  # [Hq, S]
        torch.testing.assert_close(sums[b], expected, rtol=1e-5, atol=1e-5)
        # every window query's probabilities sum to 1 over the slots
        torch.testing.assert_close(sums[b].sum(dim=1), torch.full((len(sums[b]),), float(min(obs_window, e - s)),
                                                                  device=triton_device))


def test_prefill_is_causal_and_allocates_output():
    """Without out=, a fresh output in q's dtype; changing keys and values at later positions
    leaves earlier queries' rows bit-identical."""
    gen = torch.Generator().manual_seed(7)
    q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths = make_batch(
        gen, [(0, 4, 10, False), (0, 0, 5, False)], 2, 2, 64, 4, torch.float32, False)
    out = prefill_attention(q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    later = pos_pool > 8  # only sequence 0 holds positions past 8
    k_pool[later] += 3.0
    v_pool[later] -= 2.0
    again = prefill_attention(q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths)
    early = torch.cat([q_pos[:10] <= 8, torch.ones(5, dtype=torch.bool)])
    assert torch.equal(again[early], out[early])
    assert not torch.allclose(again[~early], out[~early])


def test_query_tiles_map_each_tile_to_its_sequence():
    cu = torch.tensor([0, 1, 1, 17, 50], dtype=torch.int32)  # lengths 1, 0, 16, 33
    seq, start = query_tiles(cu, 16)  # tiles of 16 query tokens
    assert seq.tolist() == [0, 2, 3, 3, 3]
    assert start.tolist() == [0, 1, 17, 33, 49]


@pytest.mark.parametrize("group, obs_window", [(3, None), (3, 5), (4, 40)])
def test_tensor_core_path(group, obs_window, monkeypatch):
    """The path a GPU takes for a half-precision cache (tiles in their dtype on tensor cores, float32
    accumulators, the default 128-row tiles folding the GQA group into rows, a group of 3 padded
    to 4), run by the interpreter in float16, the one half precision whose dots it gets right."""
    import nanokv.kernels.prefill as prefill

    monkeypatch.setattr(prefill, "exact_dots", lambda dtype: False)
    gen = torch.Generator().manual_seed(group)
    q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths = make_batch(
        gen, [(0, 9, 40, True), (0, 0, 35, False)], 2, group, 64, 16, torch.float16, True)
    result = prefill.prefill_attention(q, q_pos, cu, k_pool, v_pool, pos_pool, tables, lengths, obs_window=obs_window)
    out, sums = result if obs_window else (result, None)
    for b in range(2):
        s, e = int(cu[b]), int(cu[b + 1])
        ref, probs = paged_attention(q[s:e].float()[None], q_pos[s:e][None], k_pool.float(), v_pool.float(), pos_pool,
                                     tables[b:b + 1], lengths[b:b + 1], None, return_probs=True)
        assert ((out[s:e].float() - ref[0]).abs().max() / ref.abs().max()) < 2e-3
        if obs_window:
            expected = probs[0, :, :, -obs_window:].sum(dim=2).flatten(0, 1)
            torch.testing.assert_close(sums[b], expected, rtol=2e-3, atol=2e-3)
