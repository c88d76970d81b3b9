"""The C++ quantized decode (nanokv/kernels/cpu_quant_decode.cpp) against its plain-torch twin,
reference.quantized_decode_attention, over the inputs of tests/test_kernels_quant.py (a real
QuantizedBlockPool: strided fields in one byte arena, random bytes in unused rows, garbage past
each head's count), and the engine's greedy tokens with kivi through the cpu kernels."""

import pytest
import torch

from nanokv.cache.quant_pool import QuantSpec
from nanokv.kernels import cpu, kernels_for, reference
from nanokv.methods import make_method
from nanokv.methods.kvtuner import KVTunerCodec
from nanokv.methods.leankv import HeteroCodec
from test_kernels_engine import PROMPTS, greedy
from test_kernels_quant import CASES, GARBAGE, codec_decoded_attention, quant_inputs, rel_err

if not cpu.load():
    pytest.skip("the C++ CPU kernels could not be built here", allow_module_level=True)

# the kernel computes in float32 and rounds once at the end; the twin runs in float32 here
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MORE_CASES = [  # bits, per channel, G, R, group, D, dtype, splits (unused), qlens [B][Hkv=2], lengths [B][Hkv=2]
    (4, True, 32, 128, 3, 64, torch.bfloat16, None, [[256, 384], [128, 0]], [[9, 1], [30, 12]]),   # SmolLM2's heads
    (2, True, 32, 128, 2, 128, torch.float32, None, [[640, 512]], [[100, 77]]),  # one sequence: splits
    (8, False, 16, 64, 4, 80, torch.float16, None, [[64, 0], [192, 128]], [[3, 3], [0, 5]]),  # no unrolled copy
]


def run(q, q_pos, pool, qtables, qlens, tables, lengths):
    args = (pool.quant_blocks(0), qtables, qlens, pool.fields["k"], pool.fields["v"], pool.fields["pos"], tables,
            lengths)
    return cpu.quantized_decode(q, q_pos, *args), reference.quantized_decode_attention(q.float(), q_pos, *args)


@pytest.mark.parametrize("bits, per_channel, G, R, group, d, dtype, splits, qlens, lengths", CASES + MORE_CASES)
def test_quantized_decode_matches_reference(bits, per_channel, G, R, group, d, dtype, splits, qlens, lengths):
    spec = QuantSpec(bits, per_channel, G, R)
    inputs = quant_inputs(bits * 100 + G + R + d + group, spec, d, dtype, group, qlens, lengths)
    got, ref = run(*inputs)
    assert got.shape == inputs[0].shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("codec, layer, d, dtype", [
    (HeteroCodec(8, 4, 32, 64), 0, 64, torch.float32),                  # LeanKV: K8V4, unrolled D
    (HeteroCodec(8, 2, 16, 32), 0, 80, torch.bfloat16),                 # K8V2, no unrolled copy
    (KVTunerCodec([(8, 8), (4, 2)], 32, 32), 1, 128, torch.float32),    # a narrow layer in rows sized for K8V8
    (KVTunerCodec([(4, 4), (2, 2)], 16, 32), 0, 64, torch.float16)])
def test_keys_and_values_at_their_own_bits_read_as_the_codec_decodes_them(codec, layer, d, dtype):
    q, q_pos, pool, qtables, qlens, tables, lengths = quant_inputs(
        d + layer, codec, d, dtype, 3, [[64, 32], [96, 0]], [[5, 2], [0, 9]], layer=layer)
    want = codec_decoded_attention(q, q_pos, pool, layer, qtables, qlens, tables, lengths)
    got = cpu.quantized_decode(q, q_pos, pool.quant_blocks(layer), qtables, qlens, pool.fields["k"], pool.fields["v"],
                               pool.fields["pos"], tables, lengths)
    assert rel_err(got, want) < TOL[dtype]


def test_masked_tokens_do_not_leak_and_quantized_ones_count():
    """Rewriting what the counts and positions hide changes nothing; dropping the quantized
    tokens changes the output."""
    spec = QuantSpec(4, True, 16, 32)
    q, q_pos, pool, qtables, qlens, tables, lengths = quant_inputs(3, spec, 64, torch.float32, 2,
                                                                   [[32, 40], [64, 16]], [[3, 5], [6, 1]])
    out, _ = run(q, q_pos, pool, qtables, qlens, tables, lengths)
    assert rel_err(run(q, q_pos, pool, qtables, torch.zeros_like(qlens), tables, lengths)[0], out) > 1e-2
    used = set(qtables[qtables >= 0].tolist()) | set(tables[tables >= 0].tolist())
    pool.arena[[i for i in range(1, pool.num_blocks) if i not in used]] = 77
    pool.qfields["v_scale"][qtables[0, 1, 1], 8:] = -GARBAGE  # head (0, 1) holds 8 tokens of its 2nd block
    for b in range(2):
        for h in range(2):
            n, bs = int(lengths[b, h]), pool.block_size
            pool.fields["k"][tables[b, h, (n - 1) // bs], (n - 1) % bs + 1:] = -3e3
    torch.testing.assert_close(run(q, q_pos, pool, qtables, qlens, tables, lengths)[0], out, rtol=0, atol=0)


def test_the_cpu_kernels_serve_quantized_decode():
    assert kernels_for("cpu", "cpu").quantized_decode.__qualname__.startswith("cpu_kernels")


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_greedy_tokens_match_the_reference(tiny, bits):
    model, cfg = tiny
    method = make_method("kivi", bits=bits, group_size=8, residual_length=16)
    assert greedy(model, cfg, PROMPTS, "cpu", method=method) == greedy(model, cfg, PROMPTS, "reference", method=method)
