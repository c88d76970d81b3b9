"""kernels.paged_decode against kernels.reference.paged_attention: under the Triton interpreter on
CPU, compiled on a CUDA GPU (`triton_device`).

Shapes are tiny (the interpreter runs each program in numpy): a handful of cases that together
cover every GQA ratio, head dim, block size, dtype, window, split count and return_probs."""

import math

import pytest
import torch

from nanokv.kernels.paged_decode import MIN_SPLIT_TOKENS, default_blocks_per_split, paged_decode_attention
from nanokv.kernels.reference import paged_attention

GARBAGE = 1e4  # large but finite (fits float16): what a stale slot past a head's length may hold


def paged_inputs(seed, lengths, group, d, block_size, dtype, hkv=2):
    """Random decode inputs: lengths [B][Hkv] tokens per head, scattered block by block into
    randomly permuted blocks of a pool whose unwritten slots hold GARBAGE (and position 0, which
    every query would see if the length mask failed). Each head keeps a random sorted subset of
    its sequence's positions plus the current token q_pos, and sometimes a future position."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    nb = max(math.ceil(n / block_size) for row in lengths for n in row)
    num_blocks = B * hkv * nb + 3  # some blocks stay unused
    k_pool = torch.full((num_blocks, block_size, d), GARBAGE)
    v_pool = torch.full((num_blocks, block_size, d), -GARBAGE)
    pos_pool = torch.zeros(num_blocks, block_size, dtype=torch.int32)
    tables = torch.full((B, hkv, nb), -1, dtype=torch.int64)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    q_pos = torch.zeros(B, dtype=torch.int64)
    for b, row in enumerate(lengths):
        q_pos[b] = max(row) + int(torch.randint(0, 20, (1,), generator=gen))
        for h, n in enumerate(row):
            # n - 1 distinct earlier-or-later positions, then the current token (always visible)
            others = torch.randperm(int(q_pos[b]) + 2, generator=gen)
            others = others[others != q_pos[b]][:n - 1]
            pos = torch.cat([others, q_pos[b:b + 1]]).sort().values
            k, v = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
            for j in range(math.ceil(n / block_size)):
                block = order.pop()
                tables[b, h, j] = block
                part = slice(j * block_size, (j + 1) * block_size)
                m = len(pos[part])
                k_pool[block, :m], v_pool[block, :m], pos_pool[block, :m] = k[part], v[part], pos[part]
    q = torch.randn(B, hkv * group, d, generator=gen)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    return q.to(dtype), q_pos, k_pool.to(dtype), v_pool.to(dtype), pos_pool, tables, lengths


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


CASES = [  # group, d, block_size, dtype, window, blocks_per_split, return_probs, lengths [B][Hkv=2]
    (1, 64, 4, torch.float32, None, 1, True, [[1, 7], [23, 9], [14, 16]]),            # a split per block
    (3, 128, 16, torch.float16, 5, None, True, [[1, 33], [40, 17]]),                # one split (default)
    (4, 64, 16, torch.float32, 7, 1, False, [[45, 3], [1, 1], [18, 30]]),           # empty splits past length
    (8, 128, 4, torch.float16, None, 3, True, [[13, 1], [25, 11]]),                 # splits of 3 blocks
    (3, 64, 4, torch.float32, 3, 2, True, [[30, 1], [6, 19]]),                      # window masks whole splits
    (8, 64, 16, torch.float16, 4, 100, False, [[50, 29], [1, 16]]),                 # one split (explicit)
]


@pytest.mark.parametrize("group,d,block_size,dtype,window,blocks_per_split,return_probs,lengths", CASES)
def test_paged_decode_matches_reference(group, d, block_size, dtype, window, blocks_per_split, return_probs,
                                        lengths, triton_device):
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths_t = (t.to(triton_device) for t in paged_inputs(
        group * 100 + d + block_size, lengths, group, d, block_size, dtype))
    assert (lengths_t % block_size != 0).any() and (lengths_t == 1).any(), "cover ragged lengths"
    assert (lengths_t[:, 0] != lengths_t[:, 1]).any(), "heads of one sequence should differ in length"
    result = paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths_t, window,
                                    return_probs=return_probs, blocks_per_split=blocks_per_split)
    out, probs = result if return_probs else (result, None)
    # the reference in float32 from the same (possibly float16) values
    ref_out, ref_probs = paged_attention(q.float()[:, None], q_pos[:, None], k_pool.float(), v_pool.float(),
                                         pos_pool, tables, lengths_t, window, return_probs=True)
    B, Hq, _ = q.shape
    assert out.shape == (B, Hq, d) and out.dtype == dtype
    # outputs and scratch start as NaN: anything the kernels failed to write would show here
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(out, ref_out[:, 0]) < tol
    if return_probs:
        nb = tables.shape[-1]
        assert probs.shape == (B, 2, group, nb * block_size) and probs.dtype == torch.float32
        assert torch.isfinite(probs).all()
        ref_probs = ref_probs[:, :, :, 0]
        assert rel_err(probs, ref_probs) < tol
        assert (probs[ref_probs == 0] == 0).all(), "masked and past-length slots weigh exactly 0"
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, 2, group, device=triton_device), rtol=0, atol=1e-5)


def test_splits_agree_and_masked_keys_do_not_leak():
    """The same inputs through one split and a split per block give the same output, and
    changing keys and values the mask hides (past the length, or outside the window) changes nothing."""
    args = paged_inputs(7, [[21, 6], [9, 26]], 4, 64, 4, torch.float32)
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = args
    one = paged_decode_attention(*args, sliding_window=6, blocks_per_split=100)
    many = paged_decode_attention(*args, sliding_window=6, blocks_per_split=1)
    assert rel_err(many, one) < 1e-6
    hidden = (q_pos[:, None, None] - pos_pool[tables.clamp(min=0)].flatten(2)) >= 6   # [B, Hkv, S]
    held = torch.arange(hidden.shape[-1]) < lengths[..., None]
    rows = (tables.clamp(min=0)[..., None] * 4 + torch.arange(4)).flatten(2)        # flat slot of each
    unused = torch.ones(k_pool.shape[0] * 4, dtype=torch.bool)
    unused[rows[held]] = False
    stale = rows[held & hidden].unique().tolist() + torch.nonzero(unused).flatten().tolist()
    assert stale, "some keys should be hidden"
    k2, v2 = k_pool.clone().view(-1, 64), v_pool.clone().view(-1, 64)
    k2[stale], v2[stale] = 3e3, -5e3
    again = paged_decode_attention(q, q_pos, k2.view_as(k_pool), v2.view_as(v_pool), pos_pool, tables, lengths,
                                   sliding_window=6, blocks_per_split=1)
    torch.testing.assert_close(again, many, rtol=0, atol=0)


def test_split_count_fills_the_device_and_no_more():
    """Split-K from the SM count: a lone sequence spreads its keys over many programs, a large
    batch already fills the device and is not split, and no split is under MIN_SPLIT_TOKENS."""
    from nanokv.kernels import launch

    sms = 132
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "num_sms", lambda device: sms)
        assert launch.split_count(8, 4096, "cuda") == 4096 // MIN_SPLIT_TOKENS       # B=1: 16 splits per head
        assert launch.split_count(32 * 8, 8192, "cuda") == 2                           # B=32 x 8 kv-heads
        assert launch.split_count(64 * 8, 32768, "cuda") == 1
        assert launch.split_count(8, 100, "cuda") == 1                                 # short context: no merge
        assert launch.split_count(1, 1 << 20, "cuda") == 64                            # capped
    assert math.ceil(3 / default_blocks_per_split(3, 16)) == 1


@pytest.mark.parametrize("return_probs", [False, True])
def test_tensor_core_path(return_probs, monkeypatch):
    """The path a GPU takes for a half-precision cache (tiles in their dtype, tl.dot on tensor cores,
    float32 accumulators), run by the interpreter in float16, the one half precision whose dots it
    gets right: the same answer as the reference, tiles spanning several blocks."""
    import nanokv.kernels.paged_decode as paged_decode

    monkeypatch.setattr(paged_decode, "exact_dots", lambda dtype: False)
    args = paged_inputs(3, [[70, 17], [5, 33]], 4, 64, 4, torch.float16)
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = args
    result = paged_decode.paged_decode_attention(*args, sliding_window=40, return_probs=return_probs,
                                                 blocks_per_split=16)
    ref_out, ref_probs = paged_attention(q.float()[:, None], q_pos[:, None], k_pool.float(), v_pool.float(),
                                         pos_pool, tables, lengths, 40, return_probs=True)
    out, probs = result if return_probs else (result, None)
    assert rel_err(out, ref_out[:, 0]) < 2e-3
    if return_probs:
        assert rel_err(probs, ref_probs[:, :, :, 0]) < 2e-3
