"""Asymmetric integer quantization in KIVI's layout: the arithmetic of a quantized block kind.

Paper: KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024),
arXiv 2402.02750. A group of numbers is stored as b-bit codes q = round((x - min) / scale) with
scale = (max - min) / (2^b - 1), plus the group's scale and min (the zero point), and read back
as q * scale + min. Keys have a few outlier channels, so they are quantized per channel over a
group of tokens (`quantize_keys`); values per token over groups of channels
(`quantize_values`). Paper defaults: group size 32 for both, the newest 128 tokens (the
residual) kept in full precision. Codes are packed 8 / b to a byte along the last axis.

This is the arithmetic the quantized block kind (nanokv/cache/quant_pool.py) writes with and the
attention over it (reference.quantized_decode_attention, quant_decode.py) reads with.
`QuantBlocks` is what a kernel is handed: the pool's packed fields and how they were made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int, scale_dtype: torch.dtype = torch.float32):
    """Codes (uint8, x's shape), scale and zero ([..., n_groups, 1, ...] along `dim`, in
    `scale_dtype`): the min/max of every run of `group_size` consecutive entries along `dim` sets
    its grid. Scale and zero are rounded to `scale_dtype` before the codes are taken, so the codes
    are the nearest ones on the grid that will be stored."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    dim = dim % x.dim()
    if x.shape[dim] % group_size:
        raise ValueError(f"length {x.shape[dim]} along dim {dim} is not a multiple of group_size={group_size}")
    # a float32 copy of its own, worked on in place: this quantizes every prompt token at prefill
    grouped = x.to(torch.float32, copy=True).unflatten(dim, (x.shape[dim] // group_size, group_size))
    low = grouped.amin(dim + 1, keepdim=True).to(scale_dtype).float()
    high = grouped.amax(dim + 1, keepdim=True)
    scale = ((high - low) / (2 ** bits - 1)).to(scale_dtype).float()
    # a constant group has scale 0: every code is 0 and reads back as its min
    codes = grouped.sub_(low).div_(torch.where(scale > 0, scale, 1.0)).round_().clamp_(0, 2 ** bits - 1)
    return codes.to(torch.uint8).flatten(dim, dim + 1), scale.to(scale_dtype), low.to(scale_dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """float32 values of `codes` quantized by `quantize(..., group_size, dim)`."""
    dim = dim % codes.dim()
    grouped = codes.float().unflatten(dim, (codes.shape[dim] // group_size, group_size))
    # addcmul: one pass over the codes (3.7x faster on CPU than a multiply then an add), and this
    # runs over the whole quantized cache at every decode step on CPU
    return torch.addcmul(zero, grouped, scale).flatten(dim, dim + 1)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int = 32, scale_dtype=torch.float32):
    """k [..., T, D]: per channel, over groups of `group_size` tokens."""
    return quantize(k, bits, group_size, dim=-2, scale_dtype=scale_dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int = 32, scale_dtype=torch.float32):
    """v [..., T, D]: per token, over groups of `group_size` channels."""
    return quantize(v, bits, group_size, dim=-1, scale_dtype=scale_dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `bits` bits [..., n] -> bytes [..., n * bits / 8], the first code in the
    lowest bits."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"the last axis ({codes.shape[-1]}) must hold a multiple of {per_byte} codes")
    parts = codes.unflatten(-1, (-1, per_byte))
    # shift-and-or on uint8 (each code fits its bits): 8x faster on CPU than an int32 sum of shifted
    # parts, and this packs every prompt token of every layer at prefill
    packed = parts[..., 0].clone()
    for i in range(1, per_byte):
        packed |= parts[..., i] << (i * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`."""
    if bits == 8:
        return packed
    # one shift-and-mask per code in a byte, on uint8 (3x faster on CPU than widening to int32
    # or a table lookup): this runs over the whole quantized cache at every decode step on CPU
    return torch.stack([(packed >> shift) & (2 ** bits - 1) for shift in range(0, 8, bits)], -1).flatten(-2)


@dataclass(frozen=True)
class QuantBlocks:
    """Quantized blocks as a kernel reads them. Block b holds `block_size` tokens of one head:
    k_codes [num_blocks, block_size, D * k_bits / 8], v_codes [..., D * v_bits / 8] uint8 (packed
    along D; a row may sit in a wider one: KVTuner's rows fit its widest layer);
    v_scale, v_zero [num_blocks, block_size, D / group_size] (per token, groups of channels);
    k_scale, k_zero [num_blocks, block_size / group_size, D] when `keys_per_channel` (KIVI: per
    channel, groups of tokens), else [num_blocks, block_size, D / group_size] like values.
    The tensors may be strided views (the pool keeps every field of a block in one row)."""
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_bits: int
    v_bits: int
    group_size: int
    keys_per_channel: bool

    @property
    def block_size(self) -> int:
        return self.k_codes.shape[1]


def quantize_tokens(k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int, keys_per_channel: bool,
                    scale_dtype=torch.float16) -> dict[str, torch.Tensor]:
    """k, v [..., T, D] -> the packed fields of QuantBlocks for those tokens (T a multiple of
    group_size when keys are per channel)."""
    k_codes, k_scale, k_zero = quantize(k, bits, group_size, dim=-2 if keys_per_channel else -1, scale_dtype=scale_dtype)
    v_codes, v_scale, v_zero = quantize_values(v, bits, group_size, scale_dtype)
    k_axis = -2 if keys_per_channel else -1
    return {"k_codes": pack(k_codes, bits), "k_scale": k_scale.squeeze(k_axis), "k_zero": k_zero.squeeze(k_axis),
            "v_codes": pack(v_codes, bits), "v_scale": v_scale.squeeze(-1), "v_zero": v_zero.squeeze(-1)}


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      per_channel: bool) -> torch.Tensor:
    """float32 [..., T, D] from packed codes [..., T, D * bits / 8] and the scale and zero of
    `quantize_tokens` ([..., T / group_size, D] per channel, [..., T, D / group_size] per token)."""
    dim = -2 if per_channel else -1
    return dequantize(unpack(codes, bits), scale.float().unsqueeze(dim), zero.float().unsqueeze(dim), group_size, dim)
