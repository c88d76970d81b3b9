"""PrunedKVCache: a PagedKVCache whose older tokens keep only some channels of their keys (ThinK).

After a layer's prefill, a channel-pruning method (nanokv/methods/think.py) picks, per kv-head,
the key channels that stay (`channels` [H, kD], the same count kD for every head) and how many
of the head's oldest tokens lose the rest. Those tokens move into *slim* blocks, keys of kD
channels (in the head's channel order) with whole values and positions, and the full-precision
blocks keep only the newer tokens (the recent window, then every decoded token), so the blocks
the older tokens left return to the pool. Per (sequence, layer, kv-head): `stables` and
`slim_lengths` for the slim part, `tables` and `lengths` (PagedKVCache's) for the rest, and the
head's kept channel list.

One pool serves both kinds, as quant_pool.py does: every block is a row of one full block's
bytes, and a slim block holds as many slim tokens as fit in it (`slim_block_size`, more than
`block_size`). Attention over such a head cuts the query to the head's kept channels for the
slim tokens (nanokv/kernels/reference.pruned_attention): the dot product over the kept channels is the
dot product with the pruned channels zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.kv_cache import PagedKVCache, SequenceKV, grown_to, pad_blocks, place_blocks
from nanokv.cache.pool import HOST, BlockPool, align, numel, row_views


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
class PrunedSequenceKV(SequenceKV):
    stables: torch.Tensor = None       # [L, H, capacity] slim block ids (-1 past)
    num_sblocks: torch.Tensor = None   # [L, H]
    slim_lengths: torch.Tensor = None  # [L, H] tokens in slim blocks (the oldest)
    channels: torch.Tensor = None      # [L, H, kD] each head's kept key channels


class PrunedKVCache(PagedKVCache):
    pool: PrunedBlockPool

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, block_size: int, key_channels: int, dtype: torch.dtype,
                    device="cpu"):
        per_block = BlockPool.block_bytes(block_size, cfg.head_dim, dtype)
        num_blocks = int(kv_cache_memory // per_block)
        per_token = cfg.num_layers * cfg.num_kv_heads
        if num_blocks < per_token + 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds {num_blocks} blocks; one token of "
                             f"this model needs {per_token} blocks ({per_token * per_block} bytes) and one more "
                             f"is reserved")
        pool = PrunedBlockPool(num_blocks, block_size, cfg.head_dim, key_channels, dtype, device)
        return cls(cfg.num_layers, cfg.num_kv_heads, pool)

    def add(self, seq_id: int):
        super().add(seq_id)
        s = self.seqs[seq_id]
        L, H, kD = self.num_layers, self.num_kv_heads, self.pool.key_channels
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=HOST)
        self.seqs[seq_id] = PrunedSequenceKV(s.tables, s.num_blocks, s.lengths,
                                             torch.full((L, H, 4), -1, dtype=torch.int64, device=HOST),
                                             zeros(L, H), zeros(L, H), zeros(L, H, kD))

    def free(self, seq_id: int):
        s = self.seqs[seq_id]
        held = torch.arange(s.stables.shape[-1], device=HOST) < s.num_sblocks[..., None]
        super().free(seq_id)
        self.pool.free(s.stables[held])

    def prune(self, seq_id: int, layer: int, channels: torch.Tensor, counts: torch.Tensor):
        """Move the oldest counts[h] tokens of each kv-head h of `layer` into slim blocks, their keys
        cut to channels[h] (kD of them); the head's full-precision blocks keep the rest. Once per
        layer of a prefill (a head holds no slim tokens before)."""
        s, pool, n = self.seqs[seq_id], self.pool, self.pool.slim_block_size
        H = self.num_kv_heads
        tables, lengths = s.tables[layer:layer + 1], s.lengths[layer:layer + 1]
        counts, channels = counts.to(HOST), channels.to(HOST)
        logical = torch.arange(int(lengths.max()), device=HOST).expand(1, H, -1)
        taken = logical < counts[None, :, None]                                 # [1, H, S] the oldest
        at = pool.slot_index(self.flat_slots(tables, logical)[taken])           # head by head, oldest first
        head = torch.repeat_interleave(torch.arange(H, device=HOST), counts)
        keys = pool.fields["k"][at].gather(-1, channels[head].to(pool.device))  # [N, kD]
        values, positions = pool.fields["v"][at], pool.fields["pos"][at]
        self.compact(seq_id, ~taken & (logical < lengths[..., None]), layers=slice(layer, layer + 1))
        blocks = (counts + n - 1) // n
        ids = pool.allocate(int(blocks.sum()))                                  # after the compaction freed
        s.stables = grown_to(s.stables, int(blocks.max()))
        place_blocks(s.stables[layer:layer + 1], s.num_sblocks[layer:layer + 1], blocks[None], ids)
        s.num_sblocks[layer] = blocks
        s.slim_lengths[layer] = counts
        s.channels[layer] = channels
        index = torch.cat([torch.arange(int(c), device=HOST) for c in counts])  # each token's slot in its head
        slots = s.stables[layer, head, index // n] * n + index % n
        for name, value in (("k", keys), ("v", values), ("pos", positions)):
            pool.slim_fields[name][pool.slim_index(slots)] = value

    # --- attention's reads: the slim part with the query cut to each head's channels, then the rest

    ragged = False
    plain_torch_only = "older keys in fewer channels"

    def blocks_read(self, s: PrunedSequenceKV) -> int:
        return int(s.num_blocks.max()) + int(s.num_sblocks.max())

    def stacked(self, seqs: list[PrunedSequenceKV]) -> list[torch.Tensor]:
        """The slim tables [L, b, H, ns], slim lengths [L, b, H] and kept channels [L, b, H, kD],
        then the full-precision tables and lengths."""
        width = max(int(s.num_sblocks.max()) for s in seqs)
        return [torch.stack([pad_blocks(s.stables, width) for s in seqs], dim=1),
                torch.stack([s.slim_lengths for s in seqs], dim=1), torch.stack([s.channels for s in seqs], dim=1),
                *super().stacked(seqs)]

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        stables, slens, channels, tables, lengths = (t[layer] for t in group)
        out = self._attend(q[:, None], positions[:, None], (stables, slens, channels), tables, lengths, sliding_window)
        return out[:, 0], self.read_bytes(lengths, slens)

    def attend_prefill(self, seq_id: int, layer: int, q, q_pos, sliding_window, column_sums: bool = False,
                       merged: bool = True):
        slim = self.slim_held(seq_id, layer)
        if slim is None or column_sums:  # nothing slim yet (a compressing prefill): a full-precision read
            return super().attend_prefill(seq_id, layer, q, q_pos, sliding_window, column_sums)
        slim = tuple(t.to(self.pool.device) for t in slim)
        return self._attend(q[None], q_pos[None], slim, *self.held(seq_id, layer), sliding_window)[0], None

    def slim_held(self, seq_id: int, layer: int):
        """One sequence's slim tables [1, H, ns], slim lengths [1, H] and channels [1, H, kD] at
        `layer`, or None while it holds no slim tokens there."""
        s = self.seqs[seq_id]
        if not bool(s.slim_lengths[layer].any()):
            return None
        return (s.stables[layer:layer + 1, :, :int(s.num_sblocks[layer].max())], s.slim_lengths[layer:layer + 1],
                s.channels[layer:layer + 1])

    def _attend(self, q, q_pos, slim, tables, lengths, sliding_window):
        f, pool = self.pool.slim_fields, self.pool
        return self.kernels.pruned_attention(q, q_pos, f["k"], f["v"], f["pos"], *slim, pool.k, pool.v, pool.pos,
                                             tables, lengths, sliding_window)

    # --- accounting -------------------------------------------------------------------

    def seq_bytes(self, seq_id: int) -> int:
        s = self.seqs[seq_id]
        return int(s.num_blocks.sum() + s.num_sblocks.sum()) * self.pool.bytes_per_block

    def slim_token_bytes(self) -> int:
        """Bytes one slim token takes: kD key channels, the whole value, its int32 position."""
        return (self.pool.key_channels + self.pool.head_dim) * self.pool.dtype.itemsize + 4

    def theoretical_bytes(self, seq_id: int) -> int:
        """The slim tokens at slim_token_bytes, the rest in full precision, and each head's channel
        list (one byte a channel), with no block rounding."""
        s = self.seqs[seq_id]
        lists = self.num_layers * self.num_kv_heads * self.pool.key_channels
        return int(s.slim_lengths.sum()) * self.slim_token_bytes() + int(s.lengths.sum()) * self.token_bytes() + lists

    def read_bytes(self, lengths: torch.Tensor, slim_lengths: torch.Tensor | None = None) -> int:
        """The full-precision blocks, and the slim blocks' tokens."""
        slim = 0 if slim_lengths is None else int(slim_lengths.sum()) * self.slim_token_bytes()
        return super().read_bytes(lengths) + slim
