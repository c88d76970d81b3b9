"""QuantizedBlockPool: one pool whose blocks are either quantized or full precision.

A quantized block holds `spec.block_size` tokens of one kv-head packed in KIVI's layout
(nanokv/kernels/quant.py): K and V codes of `bits` bits packed along the head dimension, and a float16
scale and zero point per group (keys per channel over `group_size` tokens, or per token like
values; values per token over `group_size` channels). A sequence's newest tokens, those that do
not fill a quantized block yet, stay in full precision (KIVI's residual) in full-precision
blocks of the same pool.

Both kinds share one byte budget and one free list, as vLLM unifies page sizes across kinds:
every block is one row of `unit_bytes` bytes, sized for a quantized block, and a
full-precision block holds as many tokens as fit in the same bytes (`block_size`). Each field of either kind is a strided view into the rows, so a row can serve as
either kind from one allocation to the next. Quantized blocks keep no positions: every token in
them is older than any query that reads them, so causality needs none (sliding-window layers,
which would, are refused by the engine).

Block 0 is never handed out: padded table entries point at it, and it stays zero, which reads
as finite under both kinds (0 * NaN would be NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.kernels.quant import BITS, QuantBlocks, dequantize_tokens, quantize_tokens
from nanokv.cache.codec import Codec
from nanokv.cache.pool import BlockPool, row_views

SCALE_DTYPE = torch.float16  # KIVI keeps scales and zero points in float16


@dataclass(frozen=True)
class QuantSpec(Codec):
    """KIVI's codec (kernels/quant.py), which the fused decode kernels read in place."""
    bits: int
    keys_per_channel: bool  # KIVI: keys per channel over groups of tokens; else per token
    group_size: int = 32
    block_size: int = 128   # tokens per quantized block = the residual kept in full precision
    packed = True

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.block_size % self.group_size:
            raise ValueError(f"residual_length={self.block_size} must be a multiple of group_size={self.group_size}")

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each field of a quantized block: (dtype, shape per block)."""
        if head_dim % self.group_size:
            raise ValueError(f"head_dim={head_dim} is not a multiple of group_size={self.group_size}")
        R, G, D = self.block_size, self.group_size, head_dim
        codes = (torch.uint8, (R, D * self.bits // 8))
        per_token = (SCALE_DTYPE, (R, D // G))
        keys = (SCALE_DTYPE, (R // G, D)) if self.keys_per_channel else per_token
        return {"k_codes": codes, "v_codes": codes, "k_scale": keys, "k_zero": keys,
                "v_scale": per_token, "v_zero": per_token}

    def packed_bits(self, layer):
        return self.bits, self.bits

    def encode(self, k, v, layer, importance):
        return quantize_tokens(k, v, self.bits, self.group_size, self.keys_per_channel, SCALE_DTYPE)

    def decode(self, fields, layer):
        f = fields
        return (dequantize_tokens(f["k_codes"], f["k_scale"], f["k_zero"], self.bits, self.group_size,
                                  self.keys_per_channel),
                dequantize_tokens(f["v_codes"], f["v_scale"], f["v_zero"], self.bits, self.group_size, False))


class QuantizedBlockPool(BlockPool):
    def __init__(self, num_blocks: int, spec: Codec, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if num_blocks <= 1:
            raise ValueError(f"a quantized KV-cache pool needs at least two blocks, got num_blocks={num_blocks}")
        self.spec, self.num_blocks, self.head_dim = spec, num_blocks, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.block_size = spec.full_block_size(head_dim, dtype)
        self.unit_bytes = spec.unit_bytes(head_dim)
        # empty, not zeros: on CPU untouched rows cost nothing; allocate() zeroes what attention reads
        self.arena = torch.empty(num_blocks, self.unit_bytes, dtype=torch.uint8, device=device)
        self.arena[0] = 0
        n = self.block_size
        layout = {"k": (dtype, (n, head_dim)), "v": (dtype, (n, head_dim)), "pos": (torch.int32, (n,)),
                  **{name: (field_dtype, (n,)) for name, field_dtype in spec.slot_fields.items()}}
        self.fields = row_views(self.arena, layout)
        self.qfields = row_views(self.arena, spec.field_shapes(head_dim))
        self.block_fields = {}  # no per-block metadata (Quest's bounds are for full-precision pools)
        self._init_free_list(num_blocks, first=1)

    def quant_blocks(self, layer: int) -> QuantBlocks:
        """`layer`'s blocks as the fused kernels read them (a `packed` codec's pool only): the codes
        of its own bits at the front of each row."""
        f, s, D = self.qfields, self.spec, self.head_dim
        k_bits, v_bits = s.packed_bits(layer)
        return QuantBlocks(f["k_codes"][..., :D * k_bits // 8], f["k_scale"], f["k_zero"],
                           f["v_codes"][..., :D * v_bits // 8], f["v_scale"], f["v_zero"], k_bits, v_bits,
                           s.group_size, s.keys_per_channel)

    @property
    def bytes_per_block(self) -> int:
        return self.unit_bytes

