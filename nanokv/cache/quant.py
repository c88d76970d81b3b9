"""Asymmetric integer quantization in KIVI's layout: the arithmetic of a quantized block kind.

Paper: KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024),
arXiv 2402.02750. A group of numbers is stored as b-bit codes q = round((x - min) / scale) with
scale = (max - min) / (2^b - 1), plus the group's scale and min (the zero point), and read back
as q * scale + min. Keys have a few outlier channels, so they are quantized per channel over a
group of tokens (`quantize_keys`); values per token over groups of channels
(`quantize_values`). Paper defaults: group size 32 for both, the newest 128 tokens (the
residual) kept in full precision. Codes are packed 8 / b to a byte along the last axis.

Not wired into the pool yet: this is the arithmetic the quantized block kind and its attention
kernels will share (issue "Quantized KV storage").
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int):
    """Codes (uint8, x's shape), scale and zero ([..., n_groups, 1, ...] along `dim`): the min/max
    of every run of `group_size` consecutive entries along `dim` sets its grid."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    dim = dim % x.dim()
    if x.shape[dim] % group_size:
        raise ValueError(f"length {x.shape[dim]} along dim {dim} is not a multiple of group_size={group_size}")
    grouped = x.float().unflatten(dim, (x.shape[dim] // group_size, group_size))
    low = grouped.amin(dim + 1, keepdim=True)
    high = grouped.amax(dim + 1, keepdim=True)
    scale = (high - low) / (2 ** bits - 1)
    # a constant group has scale 0: every code is 0 and reads back as its min
    codes = ((grouped - low) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, 2 ** bits - 1)
    return codes.to(torch.uint8).flatten(dim, dim + 1), scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """float32 values of `codes` quantized by `quantize(..., group_size, dim)`."""
    dim = dim % codes.dim()
    grouped = codes.float().unflatten(dim, (codes.shape[dim] // group_size, group_size))
    return (grouped * scale + zero).flatten(dim, dim + 1)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int = 32):
    """k [..., T, D]: per channel, over groups of `group_size` tokens."""
    return quantize(k, bits, group_size, dim=-2)


def quantize_values(v: torch.Tensor, bits: int, group_size: int = 32):
    """v [..., T, D]: per token, over groups of `group_size` channels."""
    return quantize(v, bits, group_size, dim=-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `bits` bits [..., n] -> bytes [..., n * bits / 8], the first code in the
    lowest bits."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"the last axis ({codes.shape[-1]}) must hold a multiple of {per_byte} codes")
    parts = codes.unflatten(-1, (-1, per_byte)).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (parts << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)
    return codes.flatten(-2).to(torch.uint8)


def packed_bytes(tokens: int, head_dim: int, bits: int, group_size: int = 32, scale_bytes: int = 2) -> int:
    """Bytes of `tokens` tokens of one head, K and V: packed codes plus a scale and a zero per
    group (key groups: group_size tokens x 1 channel; value groups: 1 token x group_size channels)."""
    codes = 2 * tokens * head_dim * bits // 8
    groups = tokens // group_size * head_dim + tokens * (head_dim // group_size)
    return codes + 2 * scale_bytes * groups
