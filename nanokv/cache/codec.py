"""Codec: what a quantized (cold) block of the tiered cache holds, and how tokens go in and out.

The tiered cache (tiered.py, quant_cache.py) keeps each head's newest tokens in full precision
and hands its oldest to a codec `block_size` tokens at a time. A codec names the fields of one
cold block (`field_shapes`: dtype and shape per block, so the bytes are the stored ones: packed
codes, scales, low-rank factors, outlier lists), fills them (`encode`) and reads them back
(`decode`). KIVI's codec (quant_pool.QuantSpec) is the one the fused decode kernels read in place
(`packed`); any other codec's cold blocks are decoded to float32 and attended by the twin
(reference.dequantized_decode_attention), the same softmax over both tiers.

A codec may rank the tokens it stores (`importance`: mixed precision by saliency, ZipCache,
MiKV): the engine then writes each prompt token's importance into the residual's slot field
"importance" at prefill (from the PrefillView), compaction moves it with its token, and `encode`
receives it. Tokens written later (decode) carry 0.

Attention is order-free over tokens older than the query, so a codec may store a block's tokens
in any order (most important first, say): `decode` returns them in the order it stored them.

A codec is given by a method (methods/), which owns the algorithm; the cache only calls it.
"""

from __future__ import annotations

import torch

from nanokv.cache.pool import align, numel

IMPORTANCE = "importance"  # the residual's slot field a ranking codec reads


class Codec:
    block_size: int  # tokens per cold block (and so the most tokens a head's residual holds)
    # True: KIVI's layout (codes packed along the head dim, float16 scales and zero points, keys per
    # channel or per token, values per token, over `group_size`), which the fused decode kernels read
    # in place at the bits `packed_bits` gives; such a codec has `group_size` and `keys_per_channel`
    packed = False
    # True: `encode` is also handed each token's position and each block's kv-head (a codec that
    # quantizes keys before RoPE undoes it with the positions; per-head calibration reads the head)
    needs_positions = False

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each field of a cold block: (dtype, shape per block)."""
        raise NotImplementedError

    def packed_bits(self, layer: int) -> tuple[int, int]:
        """A packed codec's (K bits, V bits) at `layer`. Its code rows may be wider (sized for the
        widest layer): a narrower layer's codes fill the front of each row."""
        raise NotImplementedError

    def encode(self, k: torch.Tensor, v: torch.Tensor, layer: int, importance: torch.Tensor | None,
               positions: torch.Tensor | None = None, heads: torch.Tensor | None = None) -> dict:
        """k, v [N, block_size, D] (the model's dtype; N blocks of one layer, a head's tokens
        oldest first) and importance [N, block_size] float32 (codecs with `importance`) -> each
        field [N, *shape]. Codecs with `needs_positions` also get positions [N, block_size] int32
        (each token's) and heads [N] int64 (each block's kv-head in the layer); others get None."""
        raise NotImplementedError

    def decode(self, fields: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fields [..., *shape] (any leading dims) -> k, v float32 [..., block_size, D]."""
        raise NotImplementedError

    def importance(self, view) -> torch.Tensor | None:
        """[H, S] float32 rank of each prompt token of a PrefillView (methods/base.py), or None for a
        codec that does not rank tokens (the default). Only codecs that override this get it."""
        return None

    @property
    def ranks_tokens(self) -> bool:
        return type(self).importance is not Codec.importance

    # --- bytes ---------------------------------------------------------------------------

    def quantized_bytes(self, head_dim: int, layer: int | None = None) -> int:
        """Bytes of one cold block of `layer` as stored (unaligned); a codec whose layers differ
        (KVTuner) overrides this, and `field_shapes` then gives the largest."""
        return sum(dtype.itemsize * numel(shape) for dtype, shape in self.field_shapes(head_dim).values())

    def unit_bytes(self, head_dim: int) -> int:
        """Bytes of a pool row: the fields one after another, each 4-aligned."""
        return sum(align(dtype.itemsize * numel(shape)) for dtype, shape in self.field_shapes(head_dim).values())

    def full_block_size(self, head_dim: int, dtype: torch.dtype) -> int:
        """Tokens a full-precision block holds in a row: as many as fit, K, V, an int32 position
        and the slot fields each (not a power of two: the kernels find each slot's block by division)."""
        per_token = 2 * head_dim * dtype.itemsize + 4 + sum(d.itemsize for d in self.slot_fields.values())
        return self.unit_bytes(head_dim) // per_token

    @property
    def slot_fields(self) -> dict[str, torch.dtype]:
        """What each full-precision (residual) token carries besides K, V and its position."""
        return {IMPORTANCE: torch.float32} if self.ranks_tokens else {}
