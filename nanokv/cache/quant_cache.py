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

from nanokv.kernels.reference import dequantized_decode_attention, gather_blocks
from nanokv.cache.pool import DEFAULT_BLOCK_SIZE, pool_blocks
from nanokv.cache.tiered import TieredKVCache
from nanokv.cache.codec import Codec
from nanokv.cache.quant_pool import QuantizedBlockPool


class QuantizedKVCache(TieredKVCache):
    pool: QuantizedBlockPool

    def __init__(self, num_layers: int, num_kv_heads: int, pool: QuantizedBlockPool):
        super().__init__(num_layers, num_kv_heads, pool)
        self.cold_block_size = pool.spec.block_size
        self.full_block_size = DEFAULT_BLOCK_SIZE  # full's, for uncompressed_bytes (block_size does not apply)
        self.carried_fields = tuple(pool.spec.slot_fields)

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, spec: Codec, dtype: torch.dtype, device="cpu"):
        """A cache whose pool takes `kv_cache_memory` bytes (rows of spec.unit_bytes)."""
        num_blocks = pool_blocks(kv_cache_memory, spec.unit_bytes(cfg.head_dim), cfg.num_layers * cfg.num_kv_heads, 1)
        return cls(cfg.num_layers, cfg.num_kv_heads, QuantizedBlockPool(num_blocks, spec, cfg.head_dim, dtype, device))

    @property
    def spec(self) -> Codec:
        return self.pool.spec

    @property
    def codec(self) -> Codec:
        return self.pool.spec

    def quantized_lengths(self, seq_id: int) -> torch.Tensor:
        """[L, H] tokens each head holds in quantized blocks."""
        return self.seqs[seq_id].cold_lengths

    def settle(self, seq_id: int, layers: slice | None = None):
        """Quantize every complete run of R residual tokens of the heads in `layers`."""
        layers = layers or slice(0, self.num_layers)
        R = self.spec.block_size
        self.to_cold(seq_id, layers, self.seqs[seq_id].lengths[layers] // R * R)

    def store_cold(self, s, layers, heads, slots, k, v, pos, importance=None):
        """Whole blocks of R tokens (a head's flush starts a block): the codec encodes each, in its
        block, layer by layer (a codec's bits may differ by layer)."""
        R, H, codec = self.spec.block_size, self.num_kv_heads, self.spec
        ids = (slots[::R] // R).to(self.pool.device)
        layer_of = layers.indices(self.num_layers)[0] + heads[::R].to(self.pool.device) // H  # each block's
        for layer in layer_of.unique().tolist():
            blocks = layer_of == layer
            tokens = blocks.repeat_interleave(R)
            where = {"positions": pos[tokens].view(-1, R), "heads": (heads[::R][blocks.to(heads.device)] % H)
                     .to(self.pool.device)} if codec.needs_positions else {}
            packed = codec.encode(k[tokens].view(-1, R, k.shape[-1]), v[tokens].view(-1, R, v.shape[-1]), layer,
                                  None if importance is None else importance[tokens].view(-1, R), **where)
            for name, value in packed.items():
                self.pool.qfields[name][ids[blocks]] = value.to(self.pool.qfields[name].dtype)

    # --- attention's reads: the quantized blocks, then the residual, in one softmax ---------

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        qtables, qlens, tables, lengths = (t[layer] for t in group)
        pool = self.pool
        if self.spec.packed:  # KIVI's layout: the fused kernel dequantizes in registers as it reads
            out = self.kernels.quantized_decode(q, positions, pool.quant_blocks(layer), qtables, qlens, pool.k,
                                                pool.v, pool.pos, tables, lengths)
        else:  # any other codec: its blocks decoded to float32, then the same softmax over both tiers
            k_q, v_q = self.decoded_cold(qtables, layer)
            out = dequantized_decode_attention(q, positions, k_q, v_q, qlens, pool.k, pool.v, pool.pos, tables,
                                               lengths)
        return out, self.read_bytes(lengths) + self.cold_bytes(qlens, layer)

    def decoded_cold(self, qtables: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cold blocks of tables [B, H, nq] decoded -> k, v float32 [B, H, nq * R, D]."""
        fields = {name: gather_blocks(field, qtables).unflatten(2, (qtables.shape[-1], field.shape[1]))
                  for name, field in self.pool.qfields.items()}
        k, v = self.spec.decode(fields, layer)
        return k.flatten(2, 3), v.flatten(2, 3)

    # --- accounting -------------------------------------------------------------------

    def cold_bytes(self, cold_lengths: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The codec's fields (packed codes, scales, ...) of whole cold blocks: of `layer`'s heads, or
        with no layer of every layer's (cold_lengths [L, H])."""
        R, D = self.spec.block_size, self.pool.head_dim
        if layer is not None:
            return cold_lengths.sum() // R * self.spec.quantized_bytes(D, layer)
        return sum(self.cold_bytes(lengths, at) for at, lengths in enumerate(cold_lengths))

    def most_blocks(self, tokens: int) -> int:
        """At most: the whole blocks quantized, and a full residual (just before its flush)."""
        R = self.spec.block_size
        return self.num_layers * self.num_kv_heads * (tokens // R + self.blocks_for(R))

    def blocks_held(self, tokens: int) -> int:
        R = self.spec.block_size
        return tokens // R + self.blocks_for(tokens % R)
