"""KIVI-layout quantization against an independent float64 statement, for every bit width and
group size; packing round trips; the byte formula."""

import numpy as np
import pytest
import torch

from nanokv.kernels.quant import (dequantize, dequantize_tokens, pack, quantize_keys, quantize_tokens, quantize_values,
                           unpack)
from nanokv.cache.quant_pool import QuantSpec


def float64_codes(x, bits, group_size, axis, grid_dtype=None):
    """Element by element in float64: each run of group_size along `axis` gets its own grid
    (with `grid_dtype`, its min and step rounded to that type first, as they are stored)."""
    x = np.moveaxis(x.astype(np.float64), axis, -1)
    codes, values = np.zeros(x.shape, np.int64), np.zeros(x.shape)
    levels = 2 ** bits - 1
    for index in np.ndindex(x.shape[:-1]):
        for start in range(0, x.shape[-1], group_size):
            group = x[index][start:start + group_size]
            low, high = group.min(), group.max()
            if grid_dtype is not None:
                low = float(grid_dtype(low))
            scale = (high - low) / levels
            if grid_dtype is not None:
                scale = float(grid_dtype(scale))
            for j, value in enumerate(group):
                q = 0 if scale == 0 else min(levels, max(0, int(np.floor((value - low) / scale + 0.5))))
                codes[index + (start + j,)] = q
                values[index + (start + j,)] = q * scale + low
    return np.moveaxis(codes, -1, axis), np.moveaxis(values, -1, axis)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64])
@pytest.mark.parametrize("kind", ["keys", "values"])
def test_round_trip_matches_the_float64_formula(bits, group_size, kind):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    x = torch.randn(2, 64, 128, generator=gen) * torch.linspace(0.1, 4, 128)  # channels of different ranges
    x[0, :, 5] = 1.25  # a constant channel: scale 0
    quantize = quantize_keys if kind == "keys" else quantize_values
    axis = -2 if kind == "keys" else -1
    codes, scale, zero = quantize(x, bits, group_size)
    expected_codes, expected_values = float64_codes(x.numpy(), bits, group_size, axis)
    # codes agree except where float32 and float64 round a value sitting on a .5 boundary apart
    differ = codes.numpy().astype(np.int64) != expected_codes
    assert differ.mean() < 1e-3 and np.abs(codes.numpy()[differ] - expected_codes[differ]).max(initial=0) <= 1
    got = dequantize(codes, scale, zero, group_size, axis).numpy()
    step = np.abs(np.diff(expected_values, axis=axis)).max()  # the largest grid step anywhere
    assert np.abs(got - expected_values)[~differ].max() < 1e-4 * max(1.0, np.abs(x.numpy()).max())
    assert np.abs(got - x.numpy()).max() <= 0.5 * step + 1e-5  # never more than half a step off


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [16, 32, 64])
@pytest.mark.parametrize("keys_per_channel", [True, False])
def test_stored_blocks_read_back_as_the_float64_formula_on_a_float16_grid(bits, group_size, keys_per_channel):
    """What the cache stores (packed codes, float16 scale and zero) reads back as the float64
    statement with the grid's min and step rounded to float16."""
    gen = torch.Generator().manual_seed(bits + group_size)
    k, v = (torch.randn(64, 128, generator=gen) * torch.linspace(0.1, 4, 128) for _ in range(2))
    stored = quantize_tokens(k, v, bits, group_size, keys_per_channel, torch.float16)
    assert stored["k_codes"].shape == (64, 128 * bits // 8) and stored["k_scale"].dtype == torch.float16
    for name, x, per_channel in (("k", k, keys_per_channel), ("v", v, False)):
        got = dequantize_tokens(stored[f"{name}_codes"], stored[f"{name}_scale"], stored[f"{name}_zero"], bits,
                                group_size, per_channel).numpy()
        _, expected = float64_codes(x.numpy(), bits, group_size, -2 if per_channel else -1, np.float16)
        # a value on a .5 boundary may round to the neighbouring code in float32: one step at most
        off = np.abs(got - expected)
        step = np.abs(np.diff(expected, axis=-2 if per_channel else -1)).max()
        assert (off > 1e-3).mean() < 1e-3 and off.max() <= step + 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip_and_size(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    if bits == 4:  # the first code in the low nibble
        assert pack(torch.tensor([[3, 10]], dtype=torch.uint8), 4).item() == 3 + 10 * 16


def test_packed_bytes_of_kivi():
    # 128 tokens of a 64-dim head at 2 bits, groups of 32: K and V codes 2 * 128 * 64 / 4 = 4096 bytes;
    # key groups 4 x 64, value groups 128 x 2, each a 2-byte scale and a 2-byte zero: 512 * 4 = 2048
    assert QuantSpec(2, keys_per_channel=True).quantized_bytes(64) == 4096 + 2048
    assert QuantSpec(4, keys_per_channel=True).quantized_bytes(64) == 8192 + 2048
