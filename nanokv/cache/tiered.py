"""TieredKVCache: each head's oldest tokens in cold blocks of another kind, its newest in full
precision (the hot residual).

Per (sequence, layer, kv-head), oldest first: `cold_tables` (`num_cold` blocks of
`cold_block_size` tokens each) holding `cold_lengths` tokens, then PagedKVCache's `tables` and
`lengths`. Everything PagedKVCache does (append, write, compact, prefill attention) acts on the
hot part; `to_cold` moves each head's oldest tokens out of it: it reads their K, V and positions,
compacts the rest of the residual to the front (freeing its blocks first, so the cold blocks fit),
and hands the tokens to the block kind's codec, `store_cold`, with the cold slots they take.

Two codecs (one pool, whose rows hold either kind):
- quant_cache.py: KIVI's quantized blocks of R tokens, a head's residual flushed R at a time;
- pruned_cache.py: ThinK's slim blocks, keys in fewer channels, once per layer at prefill.

A decode reads both tiers in one kernel call per group (the block kind's `attend_decode`). The cold
tables have a device mirror of their own (`cold_mirror`, device_tables.py), at the same rows as the
hot tables', kept current by the blocks `to_cold` places and `free` gives back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.device_tables import DeviceTables
from nanokv.cache.kv_cache import DecodeGroup, PagedKVCache, SequenceKV, grown_to, place_blocks
from nanokv.cache.pool import HOST


@dataclass
class TieredSequenceKV(SequenceKV):
    cold_tables: torch.Tensor = None   # [L, H, capacity] cold block ids, oldest first (-1 past)
    num_cold: torch.Tensor = None      # [L, H] cold blocks held
    cold_lengths: torch.Tensor = None  # [L, H] tokens in them (the oldest)


class TieredKVCache(PagedKVCache):
    cold_block_size: int  # tokens a cold block holds
    carried_fields: tuple[str, ...] = ()  # residual slot fields store_cold is handed with each token
    ragged = False
    eager_decode_reason = "its decode attends in groups of similar length, which change from step to step"

    def __init__(self, num_layers: int, num_kv_heads: int, pool):
        super().__init__(num_layers, num_kv_heads, pool)
        self.cold_mirror = DeviceTables(num_layers, num_kv_heads, pool.device)

    def add(self, seq_id: int):
        super().add(seq_id)
        self.cold_mirror.add(seq_id, self.mirror.rows[seq_id])
        s, (L, H) = self.seqs[seq_id], (self.num_layers, self.num_kv_heads)
        self.seqs[seq_id] = TieredSequenceKV(s.tables, s.num_blocks, s.lengths,
                                             torch.full((L, H, 4), -1, dtype=torch.int64, device=HOST),
                                             torch.zeros(L, H, dtype=torch.int64, device=HOST),
                                             torch.zeros(L, H, dtype=torch.int64, device=HOST))

    def free(self, seq_id: int):
        s = self.seqs[seq_id]
        held = torch.arange(s.cold_tables.shape[-1], device=HOST) < s.num_cold[..., None]
        super().free(seq_id)
        self.cold_mirror.remove(seq_id, s.cold_tables, s.num_cold)
        self.pool.free(s.cold_tables[held])

    def to_cold(self, seq_id: int, layers: slice, counts: torch.Tensor):
        """Move the oldest counts [L', H] hot tokens of each head of `layers` into cold blocks, after
        the cold tokens the head holds."""
        s, pool, n = self.seqs[seq_id], self.pool, self.cold_block_size
        counts = counts.to(HOST)
        if int(counts.sum()) == 0:
            return
        tables, lengths = s.tables[layers], s.lengths[layers]
        logical = torch.arange(int(lengths.max()), device=HOST).expand(*lengths.shape, -1)
        taken = logical < counts[..., None]                                   # the oldest, head by head
        at = pool.slot_index(self.flat_slots(tables, logical)[taken])
        k, v, pos = pool.fields["k"][at], pool.fields["v"][at], pool.fields["pos"][at]
        carried = {name: pool.fields[name][at] for name in self.carried_fields}
        self.compact(seq_id, ~taken & (logical < lengths[..., None]), layers)  # frees before we allocate
        cold, num_cold = s.cold_lengths[layers], s.num_cold[layers]
        need = self.cold_blocks_for(cold + counts)
        extra = need - num_cold
        ids = pool.allocate(int(extra.sum()))
        s.cold_tables = grown_to(s.cold_tables, int(need.max()))
        placed = place_blocks(s.cold_tables[layers], num_cold, extra, ids)
        self.cold_mirror.record_placed(seq_id, *placed, ids, layers.indices(self.num_layers)[0])
        s.num_cold[layers] = need
        # each moved token's cold slot: after its head's cold tokens, in order
        heads = torch.repeat_interleave(torch.arange(counts.numel(), device=HOST), counts.flatten())  # [N] in [L' * H]
        index = cold.flatten()[heads] + torch.arange(len(heads), device=HOST) - (counts.flatten().cumsum(0) -
                                                                                counts.flatten())[heads]
        block = s.cold_tables[layers].reshape(-1, s.cold_tables.shape[-1])[heads, index // n]
        s.cold_lengths[layers] = cold + counts
        self.store_cold(s, layers, heads, block * n + index % n, k, v, pos, **carried)

    def cold_blocks_for(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens + self.cold_block_size - 1) // self.cold_block_size

    def store_cold(self, s: TieredSequenceKV, layers: slice, heads: torch.Tensor, slots: torch.Tensor, k, v, pos,
                   **carried):
        """The codec: write tokens k, v [N, D], pos [N] into flat cold slots [N] (block *
        cold_block_size + offset); heads [N]: each token's head, an index into [L', H] of `layers`;
        carried: the `carried_fields` of each token [N]."""
        raise NotImplementedError

    # --- reading: the cold tier first, then the residual ---------------------------------

    def blocks_read(self, s: TieredSequenceKV) -> int:
        return int(s.num_blocks.max()) + int(s.num_cold.max())

    def mirrored_group(self, seq_ids: list[int], members: list[int]) -> DecodeGroup:
        """[members, rows, cold lengths, lengths]: both tiers' tables are gathered on the device."""
        group, seqs = super().mirrored_group(seq_ids, members), [self.seqs[s] for s in seq_ids]
        group.host.insert(2, torch.stack([s.cold_lengths for s in seqs], dim=1))
        group.widths = (max(int(s.num_cold.max()) for s in seqs), *group.widths)
        return group

    def device_group(self, group: DecodeGroup, sent: list[torch.Tensor]) -> list[torch.Tensor]:
        """-> [members, cold tables [L, b, H, nc], cold lengths [L, b, H] (and what a codec adds),
        tables, lengths]."""
        members, rows, *cold, lengths = sent
        return [members, self.cold_mirror.gather(rows, group.widths[0]), *cold,
                self.mirror.gather(rows, group.widths[1]), lengths]

    def bound_tables(self, rows: int, columns: int):
        super().bound_tables(rows, columns)
        self.cold_mirror.bound(rows, columns)

    def table_edits(self) -> list[torch.Tensor]:
        """Both mirrors' edits: [hot index, hot ids, cold index, cold ids] (empty where a tier has
        none), or nothing."""
        hot, cold = self.mirror.pending(), self.cold_mirror.pending()
        if not hot and not cold:
            return []
        none = [torch.zeros(0, dtype=torch.int64, device=HOST)] * 2
        return [*(hot or none), *(cold or none)]

    def apply_table_edits(self, edits: list[torch.Tensor]):
        if edits:
            self.mirror.apply(*edits[:2])
            self.cold_mirror.apply(*edits[2:])

    def holds_only(self, seq_id: int, layer: int, n: int) -> bool:
        return super().holds_only(seq_id, layer, n) and not bool(self.seqs[seq_id].cold_lengths[layer].any())

    def cold_held(self, seq_id: int, layer: int):
        """One sequence's cold tables [1, H, nc] and cold lengths [1, H] at `layer`, on the pool's
        device, or None while it holds no cold tokens there."""
        s = self.seqs[seq_id]
        if not bool(s.cold_lengths[layer].any()):
            return None
        device = self.pool.device
        return (s.cold_tables[layer:layer + 1, :, :int(s.num_cold[layer].max())].to(device),
                s.cold_lengths[layer:layer + 1].to(device))

    # --- accounting -------------------------------------------------------------------

    def seq_bytes(self, seq_id: int) -> int:
        s = self.seqs[seq_id]
        return int(s.num_blocks.sum() + s.num_cold.sum()) * self.pool.bytes_per_block

    def cold_bytes(self, cold_lengths: torch.Tensor) -> torch.Tensor:
        """What heads holding `cold_lengths` cold tokens take of them, with no block rounding (a
        0-d tensor on their device, as read_bytes)."""
        raise NotImplementedError

    def theoretical_bytes(self, seq_id: int) -> int:
        s = self.seqs[seq_id]
        return int(self.cold_bytes(s.cold_lengths)) + int(s.lengths.sum()) * self.token_bytes()

    def read_bytes(self, lengths: torch.Tensor, cold_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The residual's blocks (K, V, positions) and the cold tokens."""
        return super().read_bytes(lengths) + (0 if cold_lengths is None else self.cold_bytes(cold_lengths))
