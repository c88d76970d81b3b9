"""OffloadedKVCache: each head's older tokens in a second pool in host memory, its newest on the
device; a decode step reads the device part whole and recalls the host tokens a reader picks.

Per (sequence, layer, kv-head), oldest first: `host_tables` (blocks of `host`, a BlockPool in host
memory: pinned where the device is CUDA, a pool of its own on a CPU) holding `host_lengths` tokens,
then PagedKVCache's `tables` and `lengths` on the device. A layer from `skip_layers` on keeps its
newest `device_window` tokens and fewer than a block more on the device; the rest go to the host
in whole blocks (`offload`), as a prompt's layer finishes its prefill and as decode fills a block.
Layers before `skip_layers` stay whole on the device.

What a reader scores stays on the device next to the pool: per host slot, the `summaries` a method
asks for (a low-rank key, a low-bit key, hash codes, a cluster id: `summary_fields`), kept in rows
that share the host blocks' ids, and with `summary_bounds` each host block's key bounds (ArkVale's
page digests). Both count in the device's bytes. `recall` brings the picked host slots' fields to
the device (a gather on the host, one pinned non-blocking copy each); `attend_recalled` attends over
them and the device part in one softmax, through the same decode kernels as any table.

Moves to the host are asynchronous on CUDA: the rows go to pinned buffers on a copy stream of their
own and land in the host blocks (`sync_host`) before anything reads the host tier. Bytes: `seq_bytes`
and `used_bytes` are the device's (blocks and summaries), `host_used_bytes` the host's; the engine
counts the bytes each recall moves (kv_bytes_moved_per_decode_token in the stats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.kv_cache import PagedKVCache, SequenceKV, grown_to, place_blocks
from nanokv.cache.pool import HOST, BlockPool, pool_blocks
from nanokv.kernels.reference import gather_blocks

HOST_FIELDS = ("k", "v", "pos")


@dataclass
class OffloadedSequenceKV(SequenceKV):
    host_tables: torch.Tensor = None   # [L, H, capacity] host block ids, oldest first (-1 past)
    host_blocks: torch.Tensor = None   # [L, H] host blocks held
    host_lengths: torch.Tensor = None  # [L, H] tokens in them (the oldest)


class OffloadedKVCache(PagedKVCache):
    def __init__(self, num_layers: int, num_kv_heads: int, pool: BlockPool, host: BlockPool,
                 summary_fields: dict[str, tuple[torch.dtype, tuple]], summary_bounds: bool,
                 device_window: int, skip_layers: int):
        super().__init__(num_layers, num_kv_heads, pool)
        if host.block_size != pool.block_size:
            raise ValueError("the host pool's blocks must hold as many tokens as the device pool's")
        self.host, self.device_window, self.skip_layers = host, device_window, skip_layers
        device, n = pool.device, host.num_blocks
        # rows at the host blocks' ids, zeroed as their blocks are handed out (offload)
        self.summaries = {name: torch.empty(n, host.block_size, *shape, dtype=dtype, device=device)
                          for name, (dtype, shape) in summary_fields.items()}
        for summary in self.summaries.values():
            summary[0] = 0  # unpicked (-1) entries read block 0
        self.summary_bounds = {name: torch.zeros(n, pool.head_dim, dtype=pool.dtype, device=device)
                               for name in (("kmin", "kmax") if summary_bounds else ())}
        # the device bytes one host block's summaries take (what each host block costs the device)
        self.summary_block_bytes = summary_block_bytes(summary_fields, summary_bounds, host.block_size, pool.head_dim,
                                                       pool.dtype)
        # device -> host copies in flight (CUDA): (event, host slots, pinned rows), landed by sync_host
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.in_flight: list[tuple] = []
        # each sequence's reader index on the device (centroids, a basis), as the engine last counted it
        self.state_bytes: dict[int, int] = {}

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, host_memory: int, block_size: int, dtype: torch.dtype,
                    device, summary_fields: dict, summary_bounds: bool, device_window: int, skip_layers: int):
        """Device pool and summaries in `kv_cache_memory` bytes, host pool in `host_memory`."""
        device = torch.device(device)
        per_block = BlockPool.block_bytes(block_size, cfg.head_dim, dtype)
        per_token = cfg.num_layers * cfg.num_kv_heads
        summary = summary_block_bytes(summary_fields, summary_bounds, block_size, cfg.head_dim, dtype)
        # the host blocks' summaries take at most half of the device's bytes
        host_blocks = min(host_memory // per_block, kv_cache_memory // 2 // summary) if summary else host_memory // per_block
        if host_blocks < per_token + 1:
            raise ValueError(f"host_cache_memory={host_memory} bytes (with summaries of {summary} device bytes a "
                             f"block, in half of kv_cache_memory={kv_cache_memory}) holds {host_blocks} host blocks; "
                             f"one token of this model needs {per_token}: raise host_cache_memory or kv_cache_memory")
        left = kv_cache_memory - host_blocks * summary
        pool = BlockPool(pool_blocks(left, per_block, per_token), block_size, cfg.head_dim, dtype, device)
        host = BlockPool(host_blocks, block_size, cfg.head_dim, dtype, HOST, pin=device.type == "cuda")
        host.allocate(1)  # block 0 stays zero: the host gathers of unpicked (-1) entries read it
        return cls(cfg.num_layers, cfg.num_kv_heads, pool, host, summary_fields, summary_bounds, device_window,
                   skip_layers)

    # --- sequences --------------------------------------------------------------------

    def add(self, seq_id: int):
        super().add(seq_id)
        s, (L, H) = self.seqs[seq_id], (self.num_layers, self.num_kv_heads)
        self.seqs[seq_id] = OffloadedSequenceKV(s.tables, s.num_blocks, s.lengths,
                                                torch.full((L, H, 4), -1, dtype=torch.int64, device=HOST),
                                                torch.zeros(L, H, dtype=torch.int64, device=HOST),
                                                torch.zeros(L, H, dtype=torch.int64, device=HOST))

    def free(self, seq_id: int):
        s = self.seqs[seq_id]
        held = torch.arange(s.host_tables.shape[-1], device=HOST) < s.host_blocks[..., None]
        super().free(seq_id)
        self.host.free(s.host_tables[held])
        self.state_bytes.pop(seq_id, None)

    # --- the device window and the host tier ------------------------------------------

    def due_offload(self, seq_id: int, layer: int, prefill: bool) -> int:
        """Tokens each head of `layer` should move to the host now: whole blocks, so that the device
        keeps the window and fewer than a block more (at prefill all such blocks, at decode one once
        the device holds a block more than the window). The split then depends on the tokens held
        alone, so a recompute after preemption reads what the first run read. 0 before skip_layers,
        or when the host has no room (the tokens stay on the device, which the scheduler counts like
        any growing cache)."""
        if layer < self.skip_layers:
            return 0
        held = int(self.seqs[seq_id].lengths[layer].min())
        over = max(0, held - self.device_window)
        n = over - over % self.block_size if prefill else (self.block_size if over >= self.block_size else 0)
        s = self.seqs[seq_id]
        need = int((self.blocks_for(s.host_lengths[layer] + n) - s.host_blocks[layer]).sum())
        return n if need <= self.host.num_free else 0

    def offload(self, seq_id: int, layer: int, n: int, summaries: dict[str, torch.Tensor]):
        """Move each head's oldest n device tokens of `layer` to the host, after the ones it holds
        there; `summaries` {name: [H, n, ...]}: what a reader keeps of them on the device."""
        s, pool, host, H = self.seqs[seq_id], self.pool, self.host, self.num_kv_heads
        oldest = torch.arange(n, device=HOST).expand(H, n)
        at = pool.slot_index(self.flat_slots(s.tables[layer], oldest))
        rows = {name: pool.fields[name][at] for name in HOST_FIELDS}             # [H, n(, D)] on the device
        held = torch.arange(int(s.lengths[layer].max()), device=HOST)
        self.compact(seq_id, ((held >= n) & (held < s.lengths[layer][:, None]))[None], slice(layer, layer + 1))
        have = s.host_lengths[layer].clone()
        need = self.blocks_for(have + n)
        extra = need - s.host_blocks[layer]
        ids = host.allocate(int(extra.sum()))
        s.host_tables = grown_to(s.host_tables, int(need.max()))
        place_blocks(s.host_tables[layer:layer + 1], s.host_blocks[layer:layer + 1], extra[None], ids)
        s.host_blocks[layer], s.host_lengths[layer] = need, have + n
        dst = self.flat_slots(s.host_tables[layer], have[:, None] + oldest)     # [H, n] host slots
        self._to_host(dst.flatten(), {name: r.flatten(0, 1) for name, r in rows.items()})
        on_device = (dst // self.block_size).to(pool.device), (dst % self.block_size).to(pool.device)
        fresh = ids.to(pool.device)
        for summary in self.summaries.values():
            summary[fresh] = 0
        for name, value in summaries.items():
            self.summaries[name][on_device] = value.to(self.summaries[name].dtype)
        if self.summary_bounds:
            blocks = on_device[0].flatten()
            self.summary_bounds["kmin"][fresh] = torch.finfo(pool.dtype).max
            self.summary_bounds["kmax"][fresh] = torch.finfo(pool.dtype).min
            keys = rows["k"].flatten(0, 1)
            index = blocks[:, None].expand_as(keys)
            self.summary_bounds["kmin"].scatter_reduce_(0, index, keys, "amin")
            self.summary_bounds["kmax"].scatter_reduce_(0, index, keys, "amax")

    def _to_host(self, slots: torch.Tensor, rows: dict[str, torch.Tensor]):
        """Write rows {field: [N, ...]} (on the device) into host slots [N]: at once on a CPU; on
        CUDA copied into pinned buffers on the copy stream, landed by sync_host."""
        if self.copy_stream is None:
            at = self.host.slot_index(slots)
            for name, value in rows.items():
                self.host.fields[name][at] = value.to(HOST)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        with torch.cuda.stream(self.copy_stream):
            staged = {}
            for name, value in rows.items():
                staged[name] = torch.empty(value.shape, dtype=value.dtype, device=HOST, pin_memory=True)
                staged[name].copy_(value, non_blocking=True)
                value.record_stream(self.copy_stream)  # its memory is not reused before the copy ends
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.in_flight.append((event, slots, staged))

    def sync_host(self):
        """Land the copies in flight in their host slots (in the order they were made)."""
        for event, slots, staged in self.in_flight:
            event.synchronize()
            at = self.host.slot_index(slots)
            for name, value in staged.items():
                self.host.fields[name][at] = value
        self.in_flight.clear()

    def host_held(self, seq_ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The host tier's tables [b, H, nb] and lengths [b, H] of these sequences at `layer`, on the HOST."""
        seqs = [self.seqs[s] for s in seq_ids]
        width = max(1, max(int(s.host_blocks[layer].max()) for s in seqs))
        tables = torch.stack([grown_to(s.host_tables, width)[layer, :, :width] for s in seqs])
        return tables, torch.stack([s.host_lengths[layer] for s in seqs])

    def device_width(self, seq_ids: list[int], layer: int) -> int:
        """Blocks in the widest device table of these sequences at `layer` (at least 1)."""
        return max(1, max(int(self.seqs[s].num_blocks[layer].max()) for s in seq_ids))

    def read_summaries(self, host_tables: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """Summary fields of every host slot of tables [b, H, nb] -> {name: [b, H, nb * block_size, ...]}
        on the device (padding reads block 0)."""
        tables = host_tables.to(self.pool.device)
        return {name: gather_blocks(self.summaries[name], tables) for name in names}

    def read_summary_bounds(self, host_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each host page's key bounds, kmin and kmax [b, H, nb, D], on the device."""
        rows = host_tables.clamp(min=0).to(self.pool.device)
        return self.summary_bounds["kmin"][rows], self.summary_bounds["kmax"][rows]

    def read_host(self, host_tables: torch.Tensor, names=("k", "pos")) -> dict[str, torch.Tensor]:
        """Fields of every host slot of tables [b, H, nb], read where they are (on the HOST): what a
        reader that searches in host memory reads (RetrievalAttention's index)."""
        self.sync_host()
        return {name: gather_blocks(self.host.fields[name], host_tables) for name in names}

    def recall(self, host_tables: torch.Tensor, slots: torch.Tensor, names=HOST_FIELDS) -> dict[str, torch.Tensor]:
        """The fields of picked host slots [b, H, k] (logical, -1: none) of tables [b, H, nb] ->
        {name: [b, H, k(, D)]} on the device (unpicked entries read block 0's zeros)."""
        self.sync_host()
        slots = slots.to(HOST)
        flat = torch.where(slots >= 0, self.flat_slots(host_tables, slots.clamp(min=0)), 0)
        device = self.pool.device
        out = {}
        for name in names:
            rows = self.host.read_slots(flat, name)
            if device.type == "cuda":
                rows = rows.pin_memory()
            out[name] = rows.to(device, non_blocking=True)
        return out

    def attend_recalled(self, q, positions, tables, lengths, recalled: dict[str, torch.Tensor],
                        picked: torch.Tensor, sliding_window, log_weights: torch.Tensor | None = None):
        """Decode attention over each head's recalled host slots (fields [b, H, k(, D)], `picked`
        [b, H, k] the real ones) and its whole device part (tables [b, H, nb], lengths [b, H]), one
        softmax: both gathered, the real ones first, into blocks of their own that the decode
        kernels read. `log_weights` [b, H, k]: added to each recalled slot's logit (a sampling
        estimator's weight) -> (output, device bytes read)."""
        hot = self.read_tables(tables, HOST_FIELDS)                                  # [b, H, nb * bs(, D)]
        held = torch.arange(hot["k"].shape[2], device=lengths.device) < lengths[..., None]
        real = torch.cat([picked, held], dim=-1)                                     # [b, H, k + S]
        order = (~real).to(torch.int8).argsort(dim=-1, stable=True)                  # real ones first
        b, H, n = order.shape
        bs = self.block_size
        # padded to whole blocks (with each head's first row: finite, past its count) so that
        # attend_gathered has no copy left to make
        order = torch.nn.functional.pad(order, (0, -n % bs))
        # whole rows by index_select: on a CPU ~15x faster than a gather with an expanded index
        rows = (order + torch.arange(b * H, device=order.device).view(b, H, 1) * n).flatten()

        def packed(recalled_value, hot_value):
            value = torch.cat([recalled_value.to(hot_value.dtype), hot_value], dim=2)
            return value.flatten(0, 2).index_select(0, rows).view(*order.shape, *value.shape[3:])

        k, v, pos = (packed(recalled[name], hot[name]) for name in HOST_FIELDS)
        bias = None if log_weights is None else \
            packed(log_weights.float().masked_fill(~picked, 0), torch.zeros_like(hot["pos"], dtype=torch.float32))
        out = self.attend_gathered(q, positions, k, v, pos, real.sum(-1).to(tables.dtype), sliding_window, bias)
        return out, self.read_bytes(lengths)

    def recalled_bytes(self, picked: torch.Tensor, names) -> torch.Tensor:
        """Bytes a recall of the `picked` [b, H, k] slots' fields `names` moves to the device."""
        per_token = sum(self.host.fields[name][0, 0].numel() * self.host.fields[name].element_size() for name in names)
        return picked.sum() * per_token

    # --- planning and bytes ---------------------------------------------------------------

    def kept_on_device(self, n: int, layer: int) -> int:
        """Tokens each head of `layer` keeps on the device once a prompt of n has offloaded."""
        return n if layer < self.skip_layers else min(n, self.device_window)

    def host_blocks_for(self, n: int) -> int:
        """Host blocks a sequence of n tokens takes once offloaded."""
        return sum(self.num_kv_heads * self.blocks_for(n - self.kept_on_device(n, layer))
                   for layer in range(self.num_layers))

    @property
    def host_free_blocks(self) -> int:
        return self.host.num_free

    @property
    def host_capacity_blocks(self) -> int:
        return self.host.usable_blocks - 1  # block 0 is never handed out

    def most_blocks(self, tokens: int) -> int:
        """Device blocks a sequence of up to `tokens` holds while the host has room: whole before
        skip_layers, the window and the block filling behind it after."""
        return sum(self.num_kv_heads * self.blocks_for(min(tokens, self.kept_on_device(tokens, layer) + self.block_size))
                   for layer in range(self.num_layers))

    def host_seq_bytes(self, seq_id: int) -> int:
        return int(self.seqs[seq_id].host_blocks.sum()) * self.host.bytes_per_block

    def seq_bytes(self, seq_id: int) -> int:
        """The device's share: its blocks, the summaries of its host blocks and its reader's index."""
        return super().seq_bytes(seq_id) + int(self.seqs[seq_id].host_blocks.sum()) * self.summary_block_bytes + \
            self.state_bytes.get(seq_id, 0)

    def theoretical_bytes(self, seq_id: int) -> int:
        return int(self.seqs[seq_id].lengths.sum()) * self.token_bytes() + \
            int(self.seqs[seq_id].host_lengths.sum()) * (self.summary_block_bytes // self.block_size)

    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes + (self.host.num_used - 1) * self.summary_block_bytes + \
            sum(self.state_bytes.values())

    @property
    def host_used_bytes(self) -> int:
        return (self.host.num_used - 1) * self.host.bytes_per_block  # block 0 holds no sequence's


def summary_block_bytes(fields: dict, bounds: bool, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Device bytes one host block's summaries take: each summary field's slots, and key bounds."""
    per_slot = 0
    for field_dtype, shape in fields.values():
        numel = 1
        for s in shape:
            numel *= s
        per_slot += numel * field_dtype.itemsize
    return block_size * per_slot + (2 * head_dim * dtype.itemsize if bounds else 0)
