"""QuantizedKVCache: a PagedKVCache whose older tokens live in quantized blocks.

Every (sequence, layer, kv-head) holds, oldest first, `num_qblocks` quantized blocks (`qtables`,
R = spec.block_size tokens each) and then its newest tokens in full precision (`tables`,
`lengths`: the residual, fewer than R tokens between steps). Everything PagedKVCache does
(append, write, compact, prefill attention) acts on the full-precision part, so writes, prefill
and prefill-time compression are unchanged. `settle` runs after each layer's prefill and after
every decode step: a head whose residual has reached R tokens quantizes its oldest R, into a
new quantized block, and compacts the rest of its residual to the front, freeing the blocks it
no longer needs (KIVI's residual: keys are flushed R tokens at a time, as in the paper; values,
which KIVI flushes one token at a time from a sliding window of R, are flushed with them).

A compression method composes (snapkv+kivi): it compacts the prompt at prefill while it is still
in full precision, and what it keeps is then quantized. Decode-time eviction would move slots
inside quantized blocks, and is refused by the method registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.kernels.quant import quantize_tokens
from nanokv.cache.kv_cache import PagedKVCache, SequenceKV, grown_to, pad_blocks, place_blocks
from nanokv.cache.pool import HOST
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
                                            torch.full((L, H, 4), -1, dtype=torch.int64, device=HOST),
                                            torch.zeros(L, H, dtype=torch.int64, device=HOST))

    def free(self, seq_id: int):
        s = self.seqs[seq_id]
        held = torch.arange(s.qtables.shape[-1], device=HOST) < s.num_qblocks[..., None]
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
        tables, lengths = s.tables[layers], s.lengths[layers]
        logical = torch.arange(int(lengths.max()), device=HOST).expand(*lengths.shape, -1)
        taken = logical < (new * R)[..., None]                                # the oldest new * R tokens
        at = self.pool.slot_index(self.flat_slots(tables, logical)[taken])    # head by head, oldest first
        k = self.pool.fields["k"][at].view(n, R, -1)
        v = self.pool.fields["v"][at].view(n, R, -1)
        packed = quantize_tokens(k, v, self.spec.bits, self.spec.group_size, self.spec.keys_per_channel, SCALE_DTYPE)
        # the rest of the residual moves to the front of its blocks, freeing at least as many
        # rows as the quantized blocks take (a residual block holds fewer tokens than R)
        self.compact(seq_id, ~taken & (logical < lengths[..., None]), layers)
        ids = self.pool.allocate(n)
        for name, value in packed.items():
            self.pool.qfields[name][ids.to(self.pool.device)] = value
        s.qtables = grown_to(s.qtables, int((s.num_qblocks[layers] + new).max()))
        place_blocks(s.qtables[layers], s.num_qblocks[layers], new, ids)
        s.num_qblocks[layers] += new

    # --- attention's reads: the quantized blocks, then the residual, in one kernel call ------

    ragged = False

    def blocks_read(self, s: QuantSequenceKV) -> int:
        return int(s.num_blocks.max()) + int(s.num_qblocks.max())

    def stacked(self, seqs: list[QuantSequenceKV]) -> list[torch.Tensor]:
        """The quantized tables [L, b, H, nq] and token counts [L, b, H], then the residual's."""
        width, R = max(int(s.num_qblocks.max()) for s in seqs), self.spec.block_size
        return [torch.stack([pad_blocks(s.qtables, width) for s in seqs], dim=1),
                torch.stack([s.num_qblocks * R for s in seqs], dim=1), *super().stacked(seqs)]

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        qtables, qlens, tables, lengths = (t[layer] for t in group)
        pool = self.pool
        out = self.kernels.quantized_decode(q, positions, pool.quant_blocks(), qtables, qlens, pool.k, pool.v, pool.pos,
                                            tables, lengths)
        return out, self.read_bytes(lengths, qlens)

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
        return self.num_layers * self.num_kv_heads * (tokens // R + self.blocks_for(R))

    def blocks_held(self, tokens: int) -> int:
        R = self.spec.block_size
        return tokens // R + self.blocks_for(tokens % R)
