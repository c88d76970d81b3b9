"""QuantizedKVCache: a PagedKVCache whose older tokens live in quantized blocks.

Every (sequence, layer, kv-head) holds, oldest first, `num_qblocks` quantized blocks (`qtables`,
R = spec.block_size tokens each) and then its newest tokens in full precision (`tables`,
`lengths`: the residual, fewer than R tokens between steps). Everything PagedKVCache does
(append, write, compact, prefill attention) acts on the full-precision part, so writes, prefill
and prefill-time compression are unchanged. `settle` runs after each layer's prefill and after
every decode step: a head whose residual has reached R tokens quantizes them, R at a time, into
new quantized blocks and frees their full-precision blocks (KIVI's residual: keys are flushed R
tokens at a time, as in the paper; values, which KIVI flushes one token at a time from a sliding
window of R, are flushed with them).

A compression method composes (snapkv+kivi): it compacts the prompt at prefill while it is still
in full precision, and what it keeps is then quantized. Decode-time eviction would move slots
inside quantized blocks, and is refused by the method registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.quant import quantize_tokens
from nanokv.cache.kv_cache import PagedKVCache, SequenceKV, grown_to, place_blocks
from nanokv.cache.quant_pool import SCALE_DTYPE, QuantizedBlockPool, QuantSpec


@dataclass
class QuantSequenceKV(SequenceKV):
    qtables: torch.Tensor = None      # [L, H, capacity] quantized block ids, oldest first (-1 past)
    num_qblocks: torch.Tensor = None  # [L, H]


class QuantizedKVCache(PagedKVCache):
    pool: QuantizedBlockPool

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, spec: QuantSpec, dtype: torch.dtype, device="cpu"):
        """A cache whose pool takes `kv_cache_memory` bytes (rows of spec.unit_bytes)."""
        unit = spec.unit_bytes(cfg.head_dim)
        num_blocks = int(kv_cache_memory // unit)
        per_token = cfg.num_layers * cfg.num_kv_heads
        if num_blocks < per_token + 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds {num_blocks} blocks; one token of "
                             f"this model needs {per_token} blocks ({per_token * unit} bytes) and one more is reserved")
        return cls(cfg.num_layers, cfg.num_kv_heads, QuantizedBlockPool(num_blocks, spec, cfg.head_dim, dtype, device))

    @property
    def spec(self) -> QuantSpec:
        return self.pool.spec

    def add(self, seq_id: int):
        super().add(seq_id)
        s = self.seqs[seq_id]
        L, H = self.num_layers, self.num_kv_heads
        self.seqs[seq_id] = QuantSequenceKV(s.tables, s.num_blocks, s.lengths,
                                            torch.full((L, H, 4), -1, dtype=torch.int64),
                                            torch.zeros(L, H, dtype=torch.int64))

    def free(self, seq_id: int):
        s = self.seqs[seq_id]
        held = torch.arange(s.qtables.shape[-1]) < s.num_qblocks[..., None]
        super().free(seq_id)
        self.pool.free(s.qtables[held])

    def quantized_lengths(self, seq_id: int) -> torch.Tensor:
        """[L, H] tokens each head holds in quantized blocks."""
        return self.seqs[seq_id].num_qblocks * self.spec.block_size

    def settle(self, seq_id: int, layers: slice | None = None):
        """Quantize every complete run of R residual tokens of the heads in `layers`."""
        s, R = self.seqs[seq_id], self.spec.block_size
        layers = layers or slice(0, self.num_layers)
        new = s.lengths[layers] // R                                          # [L', H] blocks to make
        n = int(new.sum())
        if n == 0:
            return
        per = R // self.block_size                                            # residual blocks per quantized one
        tables = s.tables[layers]
        cols = torch.arange(tables.shape[-1])
        taken = cols < (new * per)[..., None]
        source = tables[taken]                                                # head by head, oldest first
        f = self.pool.fields
        k = f["k"][source].view(n, R, -1)
        v = f["v"][source].view(n, R, -1)
        packed = quantize_tokens(k, v, self.spec.bits, self.spec.group_size, self.spec.keys_per_channel, SCALE_DTYPE)
        # free first: the residual blocks cover at least the quantized ones, so this never runs short
        self.pool.free(source)
        ids = self.pool.allocate(n)
        for name, value in packed.items():
            self.pool.qfields[name][ids] = value
        s.qtables = grown_to(s.qtables, int((s.num_qblocks[layers] + new).max()))
        place_blocks(s.qtables[layers], s.num_qblocks[layers], new, ids)
        s.num_qblocks[layers] += new
        # the residual's remaining blocks move to the front of its table
        shift = (new * per)[..., None]
        moved = tables.gather(-1, (cols + shift).clamp(max=tables.shape[-1] - 1))
        tables.copy_(moved.masked_fill(cols + shift >= tables.shape[-1], -1))
        s.num_blocks[layers] -= new * per
        s.lengths[layers] -= new * R

    # --- accounting -------------------------------------------------------------------

    def seq_bytes(self, seq_id: int) -> int:
        s = self.seqs[seq_id]
        return int(s.num_blocks.sum() + s.num_qblocks.sum()) * self.pool.bytes_per_block

    def read_bytes(self, lengths: torch.Tensor, quantized: torch.Tensor | None = None) -> int:
        """The residual's blocks (K, V, positions) and the quantized blocks' codes and scales."""
        blocks = 0 if quantized is None else int(quantized.sum()) // self.spec.block_size
        return super().read_bytes(lengths) + blocks * self.spec.quantized_bytes(self.pool.head_dim)

    def theoretical_bytes(self, seq_id: int) -> int:
        """Packed codes, scales and zero points of the quantized tokens, plus the residual in full
        precision (with positions), with no block rounding."""
        quantized_blocks = int(self.seqs[seq_id].num_qblocks.sum())
        return (quantized_blocks * self.spec.quantized_bytes(self.pool.head_dim)
                + int(self.seqs[seq_id].lengths.sum()) * self.token_bytes())

    def uncompressed_bytes(self, tokens: int) -> int:
        """What `full` holds for the same tokens in full-precision blocks of 16 (the default)."""
        return self.num_layers * self.num_kv_heads * -(-tokens // 16) * 16 * self.token_bytes()

    def most_blocks(self, tokens: int) -> int:
        """At most: the whole blocks quantized, and a full residual (just before its flush)."""
        R = self.spec.block_size
        return self.num_layers * self.num_kv_heads * (tokens // R + R // self.block_size)

    def blocks_held(self, tokens: int) -> int:
        R = self.spec.block_size
        return tokens // R + self.blocks_for(tokens % R)
