"""PrunedKVCache: a tiered cache (tiered.py) whose older tokens keep only some channels of their keys (ThinK).

After a layer's prefill, a channel-pruning method (nanokv/methods/think.py) picks, per kv-head,
the key channels that stay (`channels` [H, kD], the same count kD for every head) and how many
of the head's oldest tokens lose the rest. Those tokens move into *slim* blocks, keys of kD
channels (in the head's channel order) with whole values and positions, and the full-precision
blocks keep only the newer tokens (the recent window, then every decoded token), so the blocks
the older tokens left return to the pool. The slim blocks are the cold tier (`cold_tables`,
`cold_lengths`), and each (sequence, layer, kv-head) also keeps its channel list (`channels`).

One pool serves both kinds, as quant_pool.py does: every block is a row of one full block's
bytes, and a slim block holds as many slim tokens as fit in it (`slim_block_size`, more than
`block_size`). Attention over such a head cuts the query to the head's kept channels for the
slim tokens (kernels.pruned_attention; on CUDA a decode kernel reading both kinds of block in place,
nanokv/kernels/two_part_decode.py): the dot product over the kept channels is the dot product with
the pruned channels zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.pool import HOST, BlockPool, align, numel, pool_blocks, row_views
from nanokv.cache.tiered import TieredKVCache, TieredSequenceKV


class PrunedBlockPool(BlockPool):
    def __init__(self, num_blocks: int, block_size: int, head_dim: int, key_channels: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if num_blocks <= 1:
            raise ValueError(f"a pruned KV-cache pool needs at least two blocks, got num_blocks={num_blocks}")
        self.num_blocks, self.block_size, self.head_dim = num_blocks, block_size, head_dim
        self.key_channels, self.dtype, self.device = key_channels, dtype, torch.device(device)
        full = layout(block_size, head_dim, head_dim, dtype)
        self.unit_bytes = sum(align(t.itemsize * numel(shape)) for t, shape in full.values())
        n = self.unit_bytes // ((key_channels + head_dim) * dtype.itemsize + 4)
        while sum(align(t.itemsize * numel(shape)) for t, shape in layout(n, key_channels, head_dim, dtype).values()) \
                > self.unit_bytes:
            n -= 1
        self.slim_block_size = n
        # empty, not zeros: on CPU untouched rows cost nothing; allocate() zeroes the rows it hands out
        self.arena = torch.empty(num_blocks, self.unit_bytes, dtype=torch.uint8, device=device)
        self.arena[0] = 0  # padded table entries read block 0
        self.fields = row_views(self.arena, full)
        self.slim_fields = row_views(self.arena, layout(n, key_channels, head_dim, dtype))
        self.block_fields = {}
        self._init_free_list(num_blocks, first=1)

    def allocate(self, n: int) -> torch.Tensor:
        ids = super().allocate(n)
        self.arena[ids.to(self.device)] = 0  # either kind reads zeros, never NaN, past what it holds
        return ids

    def slim_index(self, slots: torch.Tensor):
        """Flat slim slots (block * slim_block_size + offset) as an index into a slim field."""
        slots = slots.to(self.device)
        return slots // self.slim_block_size, slots % self.slim_block_size

    @property
    def bytes_per_block(self) -> int:
        return self.unit_bytes


def layout(tokens: int, key_channels: int, head_dim: int, dtype: torch.dtype) -> dict:
    return {"k": (dtype, (tokens, key_channels)), "v": (dtype, (tokens, head_dim)), "pos": (torch.int32, (tokens,))}


@dataclass
class PrunedSequenceKV(TieredSequenceKV):
    channels: torch.Tensor = None      # [L, H, kD] each head's kept key channels


class PrunedKVCache(TieredKVCache):
    pool: PrunedBlockPool

    def __init__(self, num_layers: int, num_kv_heads: int, pool: PrunedBlockPool):
        super().__init__(num_layers, num_kv_heads, pool)
        self.cold_block_size = pool.slim_block_size

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, block_size: int, key_channels: int, dtype: torch.dtype,
                    device="cpu"):
        num_blocks = pool_blocks(kv_cache_memory, BlockPool.block_bytes(block_size, cfg.head_dim, dtype),
                                 cfg.num_layers * cfg.num_kv_heads, 1)
        pool = PrunedBlockPool(num_blocks, block_size, cfg.head_dim, key_channels, dtype, device)
        return cls(cfg.num_layers, cfg.num_kv_heads, pool)

    def add(self, seq_id: int):
        super().add(seq_id)
        s, kD = self.seqs[seq_id], self.pool.key_channels
        self.seqs[seq_id] = PrunedSequenceKV(s.tables, s.num_blocks, s.lengths, s.cold_tables, s.num_cold,
                                             s.cold_lengths, torch.zeros(*s.lengths.shape, kD, dtype=torch.int64,
                                                                         device=HOST))

    def prune(self, seq_id: int, layer: int, channels: torch.Tensor, counts: torch.Tensor):
        """Move the oldest counts[h] tokens of each kv-head h of `layer` into slim blocks, their keys
        cut to channels[h] (kD of them); the head's full-precision blocks keep the rest. Once per
        layer of a prefill (a head holds no slim tokens before)."""
        self.seqs[seq_id].channels[layer] = channels.to(HOST)
        self.to_cold(seq_id, slice(layer, layer + 1), counts[None])

    def store_cold(self, s, layers, heads, slots, k, v, pos):
        pool = self.pool
        channels = s.channels[layers].reshape(-1, pool.key_channels)[heads].to(pool.device)
        for name, value in (("k", k.gather(-1, channels)), ("v", v), ("pos", pos)):
            pool.slim_fields[name][pool.slim_index(slots)] = value

    # --- attention's reads: the slim part with the query cut to each head's channels, then the rest

    def mirrored_group(self, seq_ids: list[int], members: list[int]):
        """[members, rows, slim lengths, kept channels [L, b, H, kD], lengths] (see TieredKVCache)."""
        group = super().mirrored_group(seq_ids, members)
        group.host.insert(3, torch.stack([self.seqs[s].channels for s in seq_ids], dim=1))
        return group

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        stables, slens, channels, tables, lengths = (t[layer] for t in group)
        out = self._attend(q[:, None], positions[:, None], (stables, slens, channels), tables, lengths, sliding_window)
        return out[:, 0], self.read_bytes(lengths, slens)

    def attend_prefill(self, seq_id: int, layer: int, q, q_pos, sliding_window, column_sums: bool = False,
                       merged: bool = True, new_kv: tuple | None = None):
        slim = self.cold_held(seq_id, layer)
        if slim is None or column_sums:  # nothing slim yet (a compressing prefill): a full-precision read
            return super().attend_prefill(seq_id, layer, q, q_pos, sliding_window, column_sums, new_kv=new_kv)
        channels = self.seqs[seq_id].channels[layer:layer + 1].to(self.pool.device)
        return self._attend(q[None], q_pos[None], (*slim, channels), *self.held(seq_id, layer), sliding_window)[0], None

    def _attend(self, q, q_pos, slim, tables, lengths, sliding_window):
        f, pool = self.pool.slim_fields, self.pool
        return self.kernels.pruned_attention(q, q_pos, f["k"], f["v"], f["pos"], *slim, pool.k, pool.v, pool.pos,
                                             tables, lengths, sliding_window)

    # --- accounting -------------------------------------------------------------------

    def slim_token_bytes(self) -> int:
        """Bytes one slim token takes: kD key channels, the whole value, its int32 position."""
        return (self.pool.key_channels + self.pool.head_dim) * self.pool.dtype.itemsize + 4

    def cold_bytes(self, cold_lengths: torch.Tensor) -> torch.Tensor:
        return cold_lengths.sum() * self.slim_token_bytes()

    def theoretical_bytes(self, seq_id: int) -> int:
        """The slim tokens at slim_token_bytes, the rest in full precision, and each head's channel
        list (one byte a channel), with no block rounding."""
        return super().theoretical_bytes(seq_id) + self.num_layers * self.num_kv_heads * self.pool.key_channels
