"""The per-slot attention-logit bias (a method's `attention_bias` slot field: KeepKV's log vote
counts) in every decode and prefill path: the plain-torch twin against an independent answer (a
cache in which a slot of bias log c is literally there c times), then the Triton decode (under its
interpreter on CPU) and the C++ CPU decode against the twin, probabilities included; and the
engine's reads with a method whose bias is all zeros equal those of the same method without one."""

import math

import pytest
import torch

from helpers import paged_layout
from nanokv.kernels import cpu, kernels_for, reference
from nanokv.kernels.paged_decode import paged_decode_attention
from test_kernels_decode import paged_inputs, rel_err


def bias_field(k_pool, seed, integer=False):
    """A float32 field [N, block_size] of log counts: log of 1..4 (integer) or of any count >= 1."""
    gen = torch.Generator().manual_seed(seed)
    shape = k_pool.shape[:2]
    counts = torch.randint(1, 5, shape, generator=gen).float() if integer else 1 + 3 * torch.rand(shape, generator=gen)
    return counts.log()


def test_a_biased_slot_weighs_as_that_many_copies_of_it():
    # One sequence, 2 kv-heads of group 2, head 0 holding 5 tokens and head 1 3, with counts
    # c = [1, 3, 2, 1, 4] and [2, 1, 1]. The right answer: the same tokens with token i written c_i
    # times (13 and 4 slots), plain attention over that. The probability of a biased slot is the sum
    # of its copies'.
    gen = torch.Generator().manual_seed(0)
    D, bs = 8, 4
    counts = [[1, 3, 2, 1, 4], [2, 1, 1]]
    heads = [(torch.randn(len(c), D, generator=gen), torch.randn(len(c), D, generator=gen), torch.arange(len(c)))
             for c in counts]
    q = torch.randn(1, 4, D, generator=gen)
    q_pos = torch.tensor([4])
    k_pool, v_pool, pos_pool, tables, lengths = paged_layout(gen, [heads], 12, bs, D, garbage=True)
    bias = torch.zeros(12, bs)
    for h, c in enumerate(counts):
        for i, n in enumerate(c):
            bias[tables[0, h, i // bs], i % bs] = math.log(n)
    copies = [(k.repeat_interleave(torch.tensor(c), 0), v.repeat_interleave(torch.tensor(c), 0),
               pos.repeat_interleave(torch.tensor(c), 0)) for (k, v, pos), c in zip(heads, counts)]
    dup = paged_layout(gen, [copies], 12, bs, D, garbage=True)
    expected, expected_probs = reference.paged_attention(q[:, None], q_pos[:, None], *dup, return_probs=True)
    out, probs = reference.paged_attention(q[:, None], q_pos[:, None], k_pool, v_pool, pos_pool, tables, lengths,
                                           return_probs=True, bias_pool=bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for h, c in enumerate(counts):
        summed = torch.stack([part.sum(-1) for part in expected_probs[0, h, :, 0, :sum(c)].split(c, dim=-1)], -1)
        torch.testing.assert_close(probs[0, h, :, 0, :len(c)], summed, rtol=1e-5, atol=1e-6)
    # the same through the prefill twin (many queries: the SDPA path with a float mask, and the
    # spelled-out one)
    for T in (3, reference.SDPA_MIN_QUERIES):
        qs = torch.randn(1, T, 4, D, generator=gen)
        pos = torch.full((1, T), 4)
        torch.testing.assert_close(reference.paged_attention(qs, pos, k_pool, v_pool, pos_pool, tables, lengths,
                                                             bias_pool=bias),
                                   reference.paged_attention(qs, pos, *dup), rtol=1e-4, atol=1e-5)


def test_a_zero_bias_changes_nothing():
    args = paged_inputs(3, [[7, 12], [20, 3]], 2, 16, 4, torch.float32)
    zero = torch.zeros(args[3].shape[:2])
    q, q_pos = args[0][:, None], args[1][:, None]
    plain = reference.paged_attention(q, q_pos, *args[2:], return_probs=True)
    biased = reference.paged_attention(q, q_pos, *args[2:], return_probs=True, bias_pool=zero)
    assert all(torch.equal(a, b) for a, b in zip(plain, biased))


CASES = [  # group, d, block_size, dtype, window, blocks_per_split, lengths [B][Hkv=2]
    (1, 16, 4, torch.float32, None, 1, [[1, 7], [23, 9]]),
    (3, 32, 8, torch.float16, 5, None, [[11, 17], [2, 30]]),
    (4, 16, 4, torch.float32, 3, 2, [[30, 1], [6, 19]]),
]


@pytest.mark.parametrize("group,d,block_size,dtype,window,blocks_per_split,lengths", CASES)
def test_triton_decode_adds_the_bias_as_the_twin_does(group, d, block_size, dtype, window, blocks_per_split, lengths,
                                                      triton_device):
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths_t = (t.to(triton_device) for t in paged_inputs(
        group + d + block_size, lengths, group, d, block_size, dtype))
    bias = bias_field(k_pool, d).to(triton_device)
    out, probs = paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths_t, window,
                                        return_probs=True, blocks_per_split=blocks_per_split, bias=bias)
    plain = paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths_t, window,
                                   blocks_per_split=blocks_per_split, bias=bias)
    ref_out, ref_probs = reference.paged_attention(q.float()[:, None], q_pos[:, None], k_pool.float(), v_pool.float(),
                                                   pos_pool, tables, lengths_t, window, return_probs=True,
                                                   bias_pool=bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(out, ref_out[:, 0]) < tol and torch.equal(out, plain)
    assert rel_err(probs, ref_probs[:, :, :, 0]) < tol
    unbiased = paged_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths_t, window,
                                      blocks_per_split=blocks_per_split)
    assert rel_err(unbiased, out) > 10 * tol, "the bias should matter here"


@pytest.mark.skipif(not cpu.load(), reason="the C++ CPU kernels could not be built here")
@pytest.mark.parametrize("group,d,block_size,dtype,window,lengths", [
    (1, 64, 4, torch.float32, None, [[1, 7], [23, 9], [14, 16]]),
    (3, 64, 16, torch.bfloat16, None, [[1, 33], [340, 17]]),     # the unrolled copy for 64
    (7, 80, 8, torch.float32, 5, [[13, 1], [25, 11]]),           # no unrolled copy
    (2, 64, 16, torch.float32, 300, [[1000, 700]]),              # one sequence: splits
])
def test_cpu_decode_adds_the_bias_as_the_twin_does(group, d, block_size, dtype, window, lengths):
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = paged_inputs(1, lengths, group, d, block_size, dtype)
    bias = bias_field(k_pool, 5)
    out, probs = cpu.paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, True, bias)
    only_out = cpu.paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, False, bias)
    exact, exact_probs = reference.paged_attention(q[:, None].float(), q_pos[:, None], k_pool.float(), v_pool.float(),
                                                   pos_pool, tables, lengths, window, return_probs=True,
                                                   bias_pool=bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, exact[:, 0]) < tol and torch.equal(out, only_out)
    assert rel_err(probs, exact_probs[:, :, :, 0]) < 1e-5
    # the kernels' dispatch (kernels_for("cpu")) takes the same op
    kernels = kernels_for("cpu", "cpu")
    torch.testing.assert_close(kernels.decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, bias=bias),
                               out, rtol=0, atol=0)


def test_every_kernel_sets_prefill_with_a_bias_to_the_twin():
    # the Triton prefill has no biased variant: it sends a biased call to the plain-torch twin;
    # the reference prefill's chunks pass the bias on
    args = paged_inputs(9, [[12, 5]], 2, 16, 4, torch.float32)
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = args
    T = 6
    qs = torch.randn(T, 4, 16, generator=torch.Generator().manual_seed(2))
    pos = torch.full((T,), int(q_pos[0]))
    cu = torch.tensor([0, T], dtype=torch.int32)
    bias = bias_field(k_pool, 7)
    expected = reference.paged_attention(qs[None], pos[None], k_pool, v_pool, pos_pool, tables, lengths,
                                         bias_pool=bias)[0]
    for name in ("reference", "triton"):
        got = kernels_for("cpu", name).prefill(qs, pos, cu, k_pool, v_pool, pos_pool, tables, lengths, None, bias=bias)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
