"""QuantizedKVCache: a tiered cache (tiered.py) whose cold blocks are quantized (KIVI's layout).

Every (sequence, layer, kv-head) holds, oldest first, quantized blocks of R = spec.block_size
tokens each (the cold tier) and then its newest tokens in full precision (the residual, fewer
than R tokens between steps). Writes, prefill and prefill-time compression act on the residual
as on any PagedKVCache. `settle` runs after each layer's prefill and after every decode step: a
head whose residual has reached R tokens quantizes its oldest R into a new quantized block (KIVI's
residual: keys are flushed R tokens at a time, as in the paper; values, which KIVI flushes one
token at a time from a sliding window of R, are flushed with them).

A compression method composes (snapkv+kivi): it compacts the prompt at prefill while it is still
in full precision, and what it keeps is then quantized. Decode-time eviction would move slots
inside quantized blocks, and is refused by the method registry.
"""

from __future__ import annotations

import torch

from nanokv.kernels.quant import quantize_tokens
from nanokv.cache.pool import DEFAULT_BLOCK_SIZE, pool_blocks
from nanokv.cache.tiered import TieredKVCache
from nanokv.cache.quant_pool import SCALE_DTYPE, QuantizedBlockPool, QuantSpec


class QuantizedKVCache(TieredKVCache):
    pool: QuantizedBlockPool

    def __init__(self, num_layers: int, num_kv_heads: int, pool: QuantizedBlockPool):
        super().__init__(num_layers, num_kv_heads, pool)
        self.cold_block_size = pool.spec.block_size
        self.full_block_size = DEFAULT_BLOCK_SIZE  # full's, for uncompressed_bytes (block_size does not apply)

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, spec: QuantSpec, dtype: torch.dtype, device="cpu"):
        """A cache whose pool takes `kv_cache_memory` bytes (rows of spec.unit_bytes)."""
        num_blocks = pool_blocks(kv_cache_memory, spec.unit_bytes(cfg.head_dim), cfg.num_layers * cfg.num_kv_heads, 1)
        return cls(cfg.num_layers, cfg.num_kv_heads, QuantizedBlockPool(num_blocks, spec, cfg.head_dim, dtype, device))

    @property
    def spec(self) -> QuantSpec:
        return self.pool.spec

    def quantized_lengths(self, seq_id: int) -> torch.Tensor:
        """[L, H] tokens each head holds in quantized blocks."""
        return self.seqs[seq_id].cold_lengths

    def settle(self, seq_id: int, layers: slice | None = None):
        """Quantize every complete run of R residual tokens of the heads in `layers`."""
        layers = layers or slice(0, self.num_layers)
        R = self.spec.block_size
        self.to_cold(seq_id, layers, self.seqs[seq_id].lengths[layers] // R * R)

    def store_cold(self, s, layers, heads, slots, k, v, pos):
        """Whole blocks of R tokens (a head's flush starts a block): quantize each, in its block."""
        R = self.spec.block_size
        packed = quantize_tokens(k.view(-1, R, k.shape[-1]), v.view(-1, R, v.shape[-1]), self.spec.bits,
                                 self.spec.group_size, self.spec.keys_per_channel, SCALE_DTYPE)
        ids = (slots[::R] // R).to(self.pool.device)
        for name, value in packed.items():
            self.pool.qfields[name][ids] = value

    # --- attention's reads: the quantized blocks, then the residual, in one kernel call ------

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        qtables, qlens, tables, lengths = (t[layer] for t in group)
        pool = self.pool
        out = self.kernels.quantized_decode(q, positions, pool.quant_blocks(), qtables, qlens, pool.k, pool.v, pool.pos,
                                            tables, lengths)
        return out, self.read_bytes(lengths, qlens)

    # --- accounting -------------------------------------------------------------------

    def cold_bytes(self, cold_lengths: torch.Tensor) -> torch.Tensor:
        """Packed codes, scales and zero points of whole quantized blocks."""
        return cold_lengths.sum() // self.spec.block_size * self.spec.quantized_bytes(self.pool.head_dim)

    def most_blocks(self, tokens: int) -> int:
        """At most: the whole blocks quantized, and a full residual (just before its flush)."""
        R = self.spec.block_size
        return self.num_layers * self.num_kv_heads * (tokens // R + self.blocks_for(R))

    def blocks_held(self, tokens: int) -> int:
        R = self.spec.block_size
        return tokens // R + self.blocks_for(tokens % R)
