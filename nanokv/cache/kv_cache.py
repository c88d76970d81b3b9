"""PagedKVCache: per (sequence, layer, kv-head) block tables over one BlockPool.

Each sequence has, for every layer l and kv-head h, its own list of blocks `tables[l, h]`,
its own `lengths[l, h]` (tokens held) and, in the pool, the position of every slot. Slot i of
(l, h) lives in block `tables[l, h, i // block_size]` at offset `i % block_size`; a *flat slot*
is `block * block_size + offset` (`pool.slot_index(slots)` turns it into an index into a field).

Uncompressed, every (l, h) of a sequence has the same length. Compression makes them differ:
`compact(keep)` gathers the kept slots of each (l, h) to its front and frees the tail blocks,
so per-layer and per-head budgets (PyramidKV, Ada-KV) return real blocks to the pool.

The tables live on the host, where the scheduler reads them; `mirror` (device_tables.py) holds a
copy on the pool's device that a decode step reads, kept current by the entries each change
records (append_slots, _shrink, free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.kernels import kernels_for
from nanokv.kernels.reference import Workspace, gather_blocks
from nanokv.cache.device_tables import DeviceTables
from nanokv.cache.pool import HOST, BlockPool, OutOfBlocks, pool_blocks
from nanokv.cache.prefix_cache import Entry, PrefixCache


@dataclass
class SequenceKV:
    tables: torch.Tensor       # [L, H, capacity] block ids (-1 past num_blocks), on the HOST
    num_blocks: torch.Tensor   # [L, H], on the HOST
    lengths: torch.Tensor      # [L, H] tokens held, on the HOST


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, pool: BlockPool):
        self.num_layers, self.num_kv_heads, self.pool = num_layers, num_kv_heads, pool
        self.block_size = pool.block_size
        # the model's shape, for what `full` would hold (uncompressed_bytes): a cache whose blocks
        # hold something else (quantized codes, latents) says so
        self.model_kv_heads, self.model_head_dim, self.full_block_size = num_kv_heads, pool.head_dim, pool.block_size
        # the layer whose KV each layer reads: itself, unless it shares an earlier one's (share_layers)
        self.sources = list(range(num_layers))
        # slots one token takes in each layer's heads: 1, or 0 in a layer that reads another's KV
        # (share_layers), or the chunks of a latent (nanokv/cache/latent_cache.py)
        self.slots_per_token = torch.ones(num_layers, dtype=torch.int64, device=HOST)
        self.slot_counts = [1] * num_layers  # the same as Python ints, for per-layer code
        self.uneven = False  # some layer's token takes other than one slot
        self.seqs: dict[int, SequenceKV] = {}
        self.workspace = Workspace()  # scratch for attention's gathers, reused every layer and step
        self.kernels = kernels_for(pool.device, workspace=self.workspace)  # Triton on CUDA, else plain torch
        # the tables mirrored on the pool's device, which a decode step reads
        self.mirror = DeviceTables(num_layers, num_kv_heads, pool.device)
        self.scratch_slot: int | None = None  # reserve_scratch
        # blocks shared across sequences (prefix_cache.py), once enable_prefix_cache is called; and
        # the entries each sequence holds, released when it is freed
        self.prefix: PrefixCache | None = None
        self.held_entries: dict[int, list[Entry]] = {}

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, block_size: int, dtype: torch.dtype, device="cpu",
                    extra_fields: dict[str, torch.dtype] | None = None, key_bounds: bool = False):
        """A cache whose pool takes `kv_cache_memory` bytes: K, V, every slot field, key bounds."""
        per_block = BlockPool.block_bytes(block_size, cfg.head_dim, dtype, extra_fields, key_bounds)
        num_blocks = pool_blocks(kv_cache_memory, per_block, cfg.num_layers * cfg.num_kv_heads)
        pool = BlockPool(num_blocks, block_size, cfg.head_dim, dtype, device, extra_fields, key_bounds)
        return cls(cfg.num_layers, cfg.num_kv_heads, pool)

    def share_layers(self, sources: list[int]):
        """Layer l reads layer sources[l]'s KV (an earlier layer that reads its own) and holds no
        blocks: nothing is ever appended to it (KVSharer). Before any sequence is added."""
        if len(sources) != self.num_layers or any(not (s == l or (0 <= s < l and sources[s] == s))
                                                  for l, s in enumerate(sources)):
            raise ValueError(f"layer sources must map each of {self.num_layers} layers to itself or to an "
                             f"earlier layer that reads its own, got {sources}")
        self.sources = list(sources)
        self.set_slots_per_token(torch.tensor([int(s == l) for l, s in enumerate(sources)], device=HOST))

    def set_slots_per_token(self, slots: torch.Tensor):
        """How many slots one token takes in each layer [L] (before any sequence is added)."""
        self.slots_per_token = slots.to(HOST, torch.int64)
        self.slot_counts = self.slots_per_token.tolist()
        self.uneven = bool((self.slots_per_token != 1).any())

    # --- sequences --------------------------------------------------------------------

    def add(self, seq_id: int):
        L, H = self.num_layers, self.num_kv_heads
        self.seqs[seq_id] = SequenceKV(torch.full((L, H, 4), -1, dtype=torch.int64, device=HOST),
                                       torch.zeros(L, H, dtype=torch.int64, device=HOST),
                                       torch.zeros(L, H, dtype=torch.int64, device=HOST))
        self.mirror.add(seq_id)

    def free(self, seq_id: int):
        s = self.seqs.pop(seq_id)
        self.mirror.remove(seq_id, s.tables, s.num_blocks)
        held = torch.arange(s.tables.shape[-1], device=HOST) < s.num_blocks[..., None]
        ids = s.tables[held]
        if self.prefix is not None:  # shared blocks stay with their entries; the newest entry goes first
            ids = ids[~self.prefix.shared[ids]]
            for entry in reversed(self.held_entries.pop(seq_id, [])):
                self.prefix.release(entry)
        self.pool.free(ids)

    # --- shared prefixes (prefix_cache.py; which prompts share is the engine's call) ----------

    def enable_prefix_cache(self) -> PrefixCache:
        if self.prefix is None:
            self.prefix = PrefixCache(self.pool)
        return self.prefix

    def attach(self, seq_id: int, entries: list[Entry], tables: torch.Tensor, lengths: torch.Tensor,
               copy_last: torch.Tensor | None = None):
        """Start an empty sequence with cached blocks: tables [L, H, nb] (-1 past a head's blocks)
        holding lengths [L, H] tokens, out of `entries` (each held once more). `copy_last` [L, H]:
        the heads whose last block is copied to a block of the sequence's own (a partial block the
        sequence will append to)."""
        s = self.seqs[seq_id]
        if int(s.num_blocks.sum()):
            raise ValueError("attach: the sequence already holds blocks")
        for entry in entries:  # first, so that the copies' allocation cannot take these back
            self.prefix.acquire(entry)
        self.held_entries.setdefault(seq_id, []).extend(entries)
        tables, lengths = tables.to(HOST).clone(), lengths.to(HOST, torch.int64)
        num_blocks = self.blocks_for(lengths)
        if copy_last is not None and bool(copy_last.any()):
            layer, head = copy_last.to(HOST).nonzero(as_tuple=True)
            last = num_blocks[layer, head] - 1
            tables[layer, head, last] = self.pool.clone_blocks(tables[layer, head, last])
        width = int(num_blocks.max())
        s.tables = grown_to(s.tables, width)
        s.tables[..., :width] = tables[..., :width]
        s.num_blocks, s.lengths = num_blocks, lengths.clone()
        placed = s.tables >= 0
        self.mirror.record(seq_id, placed.nonzero(), s.tables[placed])

    def share_blocks(self, seq_id: int, key: bytes, tokens, column: int) -> Entry:
        """Make column `column` of the sequence's tables (every (layer, head): one prefix block, full)
        an entry under `key`, which the sequence holds."""
        entry = self.prefix.insert(key, tokens, self.seqs[seq_id].tables[:, :, column])
        self.held_entries.setdefault(seq_id, []).append(entry)
        return entry

    def share_prompt(self, seq_id: int, key: bytes, tokens, lengths: torch.Tensor) -> Entry | None:
        """Make the first lengths [L, H] tokens of each head (a compressed prompt) an entry under `key`,
        which the sequence holds: its full blocks shared, each partial last block copied into a
        block the entry owns (the sequence goes on appending to its own). None: no block for the
        copies."""
        s, bs = self.seqs[seq_id], self.block_size
        lengths = lengths.to(HOST, torch.int64)
        partial = lengths % bs != 0
        if int(partial.sum()) > self.pool.num_free:
            return None
        width = int(self.blocks_for(lengths).max())
        tables = s.tables[..., :width].clone()
        cols = torch.arange(width, device=HOST)
        tables[cols >= self.blocks_for(lengths)[..., None]] = -1
        if bool(partial.any()):
            layer, head = partial.nonzero(as_tuple=True)
            last = lengths[layer, head] // bs
            tables[layer, head, last] = self.pool.clone_blocks(tables[layer, head, last])
        entry = self.prefix.insert(key, tokens, tables, lengths)
        self.held_entries.setdefault(seq_id, []).append(entry)
        return entry

    def blocks_to_append(self, seq_id: int | None, n: int) -> int:
        """Blocks the pool must supply to append n tokens to every (layer, head) of a sequence
        (None: a sequence not yet in the cache)."""
        if seq_id is None:
            return int(self.blocks_for(n * self.slots_per_token).sum()) * self.num_kv_heads
        s = self.seqs[seq_id]
        need = self.blocks_for(s.lengths + n * self.slots_per_token[:, None])
        return int((need - s.num_blocks).clamp(min=0).sum())

    def blocks_to_append_each(self, seq_ids: list[int], n: int) -> list[int]:
        """blocks_to_append for each of these sequences, in one pass over them all (a decode step
        asks it of every running sequence)."""
        if not seq_ids:
            return []
        seqs = [self.seqs[s] for s in seq_ids]
        lengths, num_blocks = torch.stack([s.lengths for s in seqs]), torch.stack([s.num_blocks for s in seqs])
        need = self.blocks_for(lengths + n * self.slots_per_token[:, None])                  # [b, L, H]
        return (need - num_blocks).clamp(min=0).flatten(1).sum(dim=1).tolist()

    def prefill_blocks(self, n: int, kept: list[int]) -> int:
        """Most blocks a prefill of n tokens holds at once when each layer is allocated in turn
        and left with kept[l] tokens a head (on average over its heads) before the next layer
        runs: the earlier layers compressed, the last one whole. A layer whose heads keep
        different lengths (Ada-KV) holds at most one partial block more per head."""
        H, per_token = self.num_kv_heads, self.slots_per_token.tolist()
        earlier = sum(H * self.blocks_held(k * m) + (0 if k >= n else H) for k, m in zip(kept[:-1], per_token))
        return earlier + H * self.blocks_for(n * per_token[-1])

    def most_blocks(self, tokens: int) -> int:
        """Most blocks a sequence of up to `tokens` tokens holds during decode (a request that
        needs more than the pool can never run)."""
        return int(self.blocks_for(tokens * self.slots_per_token).sum()) * self.num_kv_heads

    def host_blocks_for(self, n: int) -> int:
        """Blocks of a host tier (host_tier.py) a prompt of n tokens takes there: none here."""
        return 0

    host_free_blocks = host_capacity_blocks = 0  # free and usable blocks of the host tier

    def blocks_held(self, tokens: int) -> int:
        """Blocks one head holds for `tokens` tokens once its layer's prefill is done."""
        return self.blocks_for(tokens)

    def append_slots(self, seq_id: int, n: int, layers: slice | None = None) -> torch.Tensor:
        """Reserve room for n new tokens in every head of `layers` (all by default) -> their flat
        slots [L', H, n], on the HOST (the caller moves them to the pool's device to write)."""
        s = self.seqs[seq_id]
        layers = layers or slice(0, self.num_layers)
        lengths, num_blocks = s.lengths[layers], s.num_blocks[layers]
        if self.uneven:  # n tokens take n x slots_per_token slots (a shared layer's none)
            n = n * self.slots_per_token[layers][:, None]
        need = self.blocks_for(lengths + n)
        extra = (need - num_blocks).clamp(min=0)
        total = int(extra.sum())
        if total:
            ids = self.pool.allocate(total)  # raises OutOfBlocks: the scheduler checks first
            s.tables = grown_to(s.tables, int(need.max()))
            placed = place_blocks(s.tables[layers], num_blocks, extra, ids)
            self.mirror.record_placed(seq_id, *placed, ids, layers.indices(self.num_layers)[0])
            s.num_blocks[layers] = torch.maximum(num_blocks, need)
        if not self.uneven:
            slots = self.flat_slots(s.tables[layers], lengths[..., None] + torch.arange(n, device=HOST))  # [L', H, n]
        else:  # [L', H, most slots]: -1 past each layer's
            taken = torch.arange(int(n.max()), device=HOST) < n[..., None]
            logical = torch.where(taken, lengths[..., None] + torch.arange(taken.shape[-1], device=HOST), 0)
            slots = torch.where(taken, self.flat_slots(s.tables[layers], logical), -1)
        s.lengths[layers] = lengths + n
        return slots

    @property
    def slots_on_device(self) -> bool:
        """Can a decode step work out its new tokens' slots on the device, from the mirrored tables
        and the lengths (decode_slots)? Then the host only allocates (append_decode)."""
        return not self.uneven

    def append_decode(self, seq_ids: list[int]):
        """Reserve one token's room in every head of each sequence, for a decode step whose slots
        `decode_slots` works out on the device: on the host only the sequences whose next token
        needs a new block allocate (one in block_size steps); the rest just count one more."""
        for seq_id, need in zip(seq_ids, self.blocks_to_append_each(seq_ids, 1)):
            if need:
                self.append_slots(seq_id, 1)
            else:
                self.seqs[seq_id].lengths += 1

    def decode_slots(self, tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The flat slots [L, H, b] of each head's newest token, from the batch's tables [L, b, H, nb]
        and lengths [L, b, H] (counting it), on their device."""
        last = lengths - 1
        blocks = tables.gather(-1, (last // self.block_size)[..., None])[..., 0]
        return (blocks * self.block_size + last % self.block_size).transpose(1, 2)

    def expect_positions(self, last: int):
        """The newest position the coming step writes or attends from, counted on the host (a block
        kind that keeps a table by position grows it here: the latent cache's RoPE)."""

    def blocks_for(self, tokens):
        """Blocks that hold `tokens` slots of one head (an int or a tensor of counts)."""
        return (tokens + self.block_size - 1) // self.block_size

    def flat_slots(self, tables: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Logical slot indices [..., n] of the heads whose tables are [..., capacity] -> flat slots."""
        blocks = torch.gather(tables, -1, logical // self.block_size)
        return blocks * self.block_size + logical % self.block_size

    # --- attention's reads and writes ---------------------------------------------------
    # What one step's attention (nanokv/engine/attention.py) calls; each block kind overrides what
    # it stores differently, and reads through self.kernels, so the engine never looks at the pool.

    ragged = True  # a decode may take the whole batch in one call when the kernel reads ragged lengths
    # why a decode step over this block kind cannot be a CUDA graph (engine/cuda_graphs.py); None: it can
    eager_decode_reason: str | None = None
    codec = None  # what encodes a tiered cache's cold blocks (codec.py); None: one kind of block

    def pair_of(self, layer: int) -> int | None:
        """The first layer of the merged pair whose second layer is `layer` (PairedKVCache), or None."""
        return None

    def holds_only(self, seq_id: int, layer: int, n: int) -> bool:
        """Does every head hold exactly n tokens at `layer` (a prompt just written, nothing before)?"""
        return bool((self.seqs[seq_id].lengths[layer] == n).all())

    def held(self, seq_id: int, layer: int):
        """One sequence's tables [1, H, nb] and lengths [1, H] at `layer`, on the pool's device."""
        s, device = self.seqs[seq_id], self.pool.device
        return (s.tables[layer:layer + 1, :, :int(s.num_blocks[layer].max())].to(device),
                s.lengths[layer:layer + 1].to(device))

    def decode_groups(self, seq_ids: list[int], whole_batch: bool) -> list[DecodeGroup]:
        """The decode step's sequences in groups attended one call each. A group holds sequences
        of similar length, so a short one is not padded to the longest of the batch; `whole_batch`
        (a kernel that reads each head only to its length) takes all of them at once. Each group's
        `host` tensors go to the device with the step's other inputs, in one copy; `device_group`
        then makes them [members [b], the block kind's tables and lengths, each [L, b, ...]]."""
        seqs = [self.seqs[s] for s in seq_ids]
        members = [list(range(len(seqs)))] if whole_batch else length_groups([self.blocks_read(s) for s in seqs])
        return [self.mirrored_group([seq_ids[i] for i in m], m) for m in members]

    def mirrored_group(self, seq_ids: list[int], members: list[int]) -> DecodeGroup:
        """One group's host part: the tables are on the device already, so what goes there is the
        rows that hold them and the lengths ([members, rows, lengths]); `device_group` gathers the
        tables."""
        seqs = [self.seqs[s] for s in seq_ids]
        return DecodeGroup([torch.tensor(members, device=HOST),
                            torch.tensor([self.mirror.rows[s] for s in seq_ids], device=HOST),
                            torch.stack([s.lengths for s in seqs], dim=1)],
                           widths=(max(int(s.num_blocks.max()) for s in seqs),))

    def bound_tables(self, rows: int, columns: int):
        """The most sequences (rows, the empty one included) and blocks a head (columns) the
        tables' mirror grows to by doubling (DeviceTables.bound)."""
        self.mirror.bound(rows, columns)

    def table_edits(self) -> list[torch.Tensor]:
        """What changed in the tables since the last decode step, for its one copy to the device
        (an empty list when nothing did)."""
        return self.mirror.pending()

    def apply_table_edits(self, edits: list[torch.Tensor]):
        """table_edits' tensors, now on the device, written into the mirror."""
        if edits:
            self.mirror.apply(*edits)

    def device_group(self, group: DecodeGroup, sent: list[torch.Tensor]) -> list[torch.Tensor]:
        """A group's host tensors as sent to the device -> [members, tables, lengths, ...]."""
        members, rows, lengths = sent
        return [members, self.mirror.gather(rows, group.widths[0]), lengths]

    def blocks_read(self, s: SequenceKV) -> int:
        return int(s.num_blocks.max())

    def write_decode(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """A decode step's new tokens at `layer` into the slots append_slots reserved [H, b]; a layer
        that reads another's KV (share_layers) keeps none."""
        if self.sources[layer] == layer:
            self.write(slots, k, v, positions)

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window, **bias):
        """A group's queries [b, Hq, D] over what its sequences hold at `layer` (or at the layer
        whose KV it shares) -> (output [b, Hq, D], KV bytes read). `bias`: as attend_tables (full
        precision blocks only: the other block kinds take none)."""
        tables, lengths = (t[self.sources[layer]] for t in group)
        return self.attend_tables(q, positions, tables, lengths, sliding_window, **bias), self.read_bytes(lengths)

    def attend_tables(self, q, positions, tables, lengths, sliding_window, return_probs: bool = False,
                      bias: str | None = None):
        """Decode attention over explicit tables [b, H, nb] and lengths [b, H] of full-precision
        blocks (a method's reduced tables, Quest; with return_probs also the probabilities, H2O).
        `bias`: the slot field added to each slot's attention logit (a method's attention_bias)."""
        pool = self.pool
        if bias is not None:  # the kernels' biased variant; without one, exactly the plain call
            return self.kernels.decode(q, positions, pool.k, pool.v, pool.pos, tables, lengths, sliding_window,
                                       return_probs, bias=pool.fields[bias])
        return self.kernels.decode(q, positions, pool.k, pool.v, pool.pos, tables, lengths, sliding_window, return_probs)

    def read_tables(self, tables: torch.Tensor, names=("k", "pos")) -> dict[str, torch.Tensor]:
        """Slot fields of explicit tables [b, H, nb], each head's slots in order -> {name: [b, H,
        nb * block_size(, D)]} (what a query-aware reader scores; -1 entries read block 0)."""
        return {name: gather_blocks(self.pool.fields[name], tables) for name in names}

    def table_bounds(self, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each page's key bounds, kmin and kmax [b, H, nb, D], of explicit tables [b, H, nb]."""
        rows = tables.clamp(min=0)
        return tuple(bound[rows] for bound in self.key_bounds())

    def pick_pages(self, tables: torch.Tensor, lengths: torch.Tensor, pages: torch.Tensor):
        """Reduced tables of picked pages [b, H, k] (page indices of tables [b, H, nb], -1: none)
        -> (tables [b, H, k] of the picked blocks in page order, -1 after; the tokens they hold
        [b, H]). Only a head's newest page can be partial, and page order puts it last."""
        bs = self.block_size
        nb = tables.shape[-1]
        pages = torch.where(pages < 0, nb, pages).sort(dim=-1).values           # -1 after the picks
        picked = pages < nb
        reduced = tables.gather(-1, pages.clamp(max=nb - 1)).masked_fill(~picked, -1)
        tokens = (lengths[..., None] - pages * bs).clamp(0, bs).masked_fill(~picked, 0)
        return reduced, tokens.sum(-1)

    def attend_slots(self, q, positions, tables, slots, sliding_window):
        """Decode attention over single picked slots [b, H, k] of explicit tables [b, H, nb] (-1:
        none; a token-level reader's picks): they are gathered, in slot order, into blocks of their
        own, which the kernels read like any table -> (output, KV bytes read)."""
        pool, bs = self.pool, self.block_size
        nb = tables.shape[-1]
        far = nb * bs
        slots = torch.where(slots < 0, far, slots).sort(dim=-1).values
        picked = slots < far
        blocks = tables.gather(-1, (slots // bs).clamp(max=nb - 1)).clamp(min=0)
        rows = torch.where(picked, blocks.long() * bs + slots % bs, 0)   # unpicked: block 0's first slot, finite
        k, v, pos = (pool.read_slots(rows, name) for name in ("k", "v", "pos"))
        lengths = picked.sum(-1).to(tables.dtype)
        return self.attend_gathered(q, positions, k, v, pos, lengths, sliding_window), lengths.sum() * self.token_bytes()

    def attend_gathered(self, q, positions, k, v, pos, counts, sliding_window, bias: torch.Tensor | None = None):
        """Decode attention over tokens gathered per head, k, v [b, H, n, D] and pos [b, H, n], each
        head's `counts` [b, H] real ones first (the rest finite): packed into blocks of their own,
        which the decode kernels read like any table. `bias` [b, H, n] float32: added to each
        token's logit (the kernels' biased variant)."""
        bs = self.block_size
        b, H, n = pos.shape
        width = -(-n // bs)

        def blocks(x):  # [b, H, n, ...] -> [b * H * width, bs, ...], zeros after n
            if n < width * bs:
                x = torch.nn.functional.pad(x, [0, 0] * (x.dim() - 3) + [0, width * bs - n])
            return x.reshape(b * H * width, bs, *x.shape[3:])

        table = torch.arange(b * H * width, dtype=counts.dtype, device=counts.device).view(b, H, width)
        biased = {} if bias is None else {"bias": blocks(bias)}
        return self.kernels.decode(q, positions, blocks(k), blocks(v), blocks(pos), table, counts, sliding_window,
                                   False, **biased)

    def write_prefill(self, seq_id: int, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Append one sequence's new tokens k, v [T, H, D] at `layer` and write them."""
        slots = self.append_slots(seq_id, len(k), layers=slice(layer, layer + 1))[0]
        self.write(slots.to(self.pool.device), k, v, positions)

    def attend_prefill(self, seq_id: int, layer: int, q, q_pos, sliding_window, column_sums: bool = False,
                       merged: bool = True, new_kv: tuple | None = None, bias: str | None = None):
        """One sequence's queries [T, Hq, D] over what it holds at `layer` -> (output, and with
        `column_sums` the attention each slot received [H, nb * block_size], summed over the queries
        and averaged over each kv-head's query heads). `merged`: see PairedKVCache. `new_kv`: the
        queries' own k, v [T, H, D]: where the sequence holds those alone, the kernels' fresh_prefill
        attends over them in hand instead of through the pool (a fresh prompt's slots carry no
        bias). `bias`: as attend_tables."""
        if (new_kv is not None and self.kernels.fresh_prefill is not None and not column_sums
                and sliding_window is None and self.holds_only(seq_id, layer, len(q))):
            return self.kernels.fresh_prefill(q, *new_kv), None
        pool, (tables, lengths) = self.pool, self.held(seq_id, layer)
        if bias is not None and self.holds_only(seq_id, layer, len(q)):
            bias = None  # a prompt's own fresh slots: every bias is 0 (write starts a slot field afresh)
        cu_seqlens = torch.tensor([0, len(q)], dtype=torch.int32, device=q.device)
        biased = {} if bias is None else {"bias": pool.fields[bias]}
        result = self.kernels.prefill(q, q_pos, cu_seqlens, pool.k, pool.v, pool.pos, tables, lengths,
                                      sliding_window, obs_window=len(q) if column_sums else None, **biased)
        if not column_sums:
            return result, None
        out, sums = result                                                 # sums [1, Hq, S]
        return out, sums[0].view(tables.shape[1], -1, sums.shape[-1]).mean(dim=1)

    # --- what compression reads and writes (a method's slot fields, the prompt's K/V) ------

    def read_prompt(self, seq_id: int, layer: int, n: int, fields=("k", "pos")) -> dict[str, torch.Tensor]:
        """The first n slots of each head of `layer` (a just-prefilled prompt), per field: [H, n(, D)]
        ("pos": [n], the first head's: a prefill writes every head alike)."""
        tables = self.held(seq_id, layer)[0][0]
        return {name: gather_blocks(self.pool.fields[name], tables[:1] if name == "pos" else tables)
                [0 if name == "pos" else slice(None), :n] for name in fields}

    def write_prompt(self, seq_id: int, layer: int, n: int, values: dict[str, torch.Tensor]):
        """Set fields of the first n slots of each head of `layer`: values [H, n(, D)] per field."""
        tables, pool = self.held(seq_id, layer)[0][0], self.pool
        prompt = pool.slot_index(self.flat_slots(tables, torch.arange(n, device=pool.device).expand(len(tables), n)))
        for name, value in values.items():
            pool.fields[name][prompt] = value.to(pool.fields[name].dtype)

    def read_slots(self, tables: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """Every slot of heads with tables [b, H, nb], per field: [b, H, nb * block_size(, D)], in
        slot order (padding reads block 0)."""
        out = {}
        for name in names:
            field = self.pool.fields[name]
            # whole blocks through index_select where the field's blocks are rows: ~10x faster on
            # CPU than advanced indexing slot by slot
            out[name] = gather_blocks(field, tables) if field.is_contiguous() else \
                field[self.pool.slot_index(self.slots_of(tables).clamp(min=0))]
        return out

    def write_slots(self, tables: torch.Tensor, where: torch.Tensor, values: dict[str, torch.Tensor]):
        """Set fields at the slots `where` [b, H, S] marks of heads with tables [b, H, nb]: values
        [b, H, S(, D)] per field. The slots `where` leaves out are written to the scratch slot
        instead (reserve_scratch): picking the marked ones out would make a GPU's host wait."""
        at = self.pool.slot_index(torch.where(where, self.slots_of(tables), self.reserve_scratch()))
        for name, value in values.items():
            field = self.pool.fields[name]
            field[at] = value.to(field.dtype)

    def reserve_scratch(self) -> int:
        """A flat slot that no table holds, set aside from the pool at the first call (before the
        first step that needs it: the runner calls this at its start): where a decode's writes and
        moves that must not land anywhere go (padding rows, heads that evict nothing)."""
        if self.scratch_slot is None:
            self.scratch_slot = self.pool.set_aside() * self.block_size
        return self.scratch_slot

    def slots_of(self, tables: torch.Tensor) -> torch.Tensor:
        """Flat slots [..., nb * block_size] of every slot of tables [..., nb] (padding: < 0)."""
        bs = self.block_size
        return (tables[..., None] * bs + torch.arange(bs, device=tables.device)).flatten(-2)

    def key_bounds(self):
        """Each block's smallest and largest key per channel, kmin and kmax [N, D] (Quest's pages)."""
        return self.pool.block_fields["kmin"], self.pool.block_fields["kmax"]

    # --- writes -----------------------------------------------------------------------

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """slots: [H, T] flat slots of one layer; k, v: [T, H, D]; positions: [T]."""
        f = self.pool.fields
        self.kernels.write_kv(f["k"], f["v"], f["pos"], slots, k, v, positions)
        for name in f.keys() - {"k", "v", "pos"}:  # a method's state starts afresh
            # a zero made on the device: a Python 0 would be copied from the host, a wait for the GPU
            zero = torch.zeros((), dtype=f[name].dtype, device=f[name].device)
            f[name][self.pool.slot_index(slots.flatten())] = zero
        if self.pool.block_fields:  # widen each written block's key bounds by its new keys
            blocks = (slots // self.block_size).flatten()
            keys = k.transpose(0, 1).reshape(-1, k.shape[-1]).to(self.pool.dtype)
            rows = blocks[:, None].expand_as(keys)
            self.pool.block_fields["kmin"].scatter_reduce_(0, rows, keys, "amin")
            self.pool.block_fields["kmax"].scatter_reduce_(0, rows, keys, "amax")

    # --- compaction -------------------------------------------------------------------

    def compact(self, seq_id: int, keep: torch.Tensor, layers: slice | None = None):
        """Keep the slots marked in `keep` ([L', H, S] bool over logical slots, for `layers`, all by
        default) and drop the rest: kept slots move, in order, to the front of their head; every
        slot field moves with them; tail blocks go back to the pool."""
        s = self.seqs[seq_id]
        layers = layers or slice(0, self.num_layers)
        tables, lengths = s.tables[layers], s.lengths[layers]
        keep = keep.to(HOST)
        S = keep.shape[-1]
        if bool((keep & (torch.arange(S, device=HOST) >= lengths[..., None])).any()):
            raise ValueError("compact: keep marks slots past a head's length")
        keep = keep[..., :tables.shape[-1] * self.block_size]  # a wider mask (padded to a batch) marks nothing there
        S = keep.shape[-1]
        counts = keep.sum(-1)                                                # [L', H]
        src = self.flat_slots(tables, torch.arange(S, device=HOST).expand_as(keep))[keep]
        dst_logical = torch.cumsum(keep, -1) - 1                             # rank among kept
        dst = self.flat_slots(tables, dst_logical.clamp(min=0))[keep]
        self.move_slots(src, dst)
        self._shrink(seq_id, layers, counts)
        self._refresh_key_bounds(s, layers)

    def drop_last(self, seq_id: int, drop: torch.Tensor, layers: slice | None = None):
        """Shorten each head by its last `drop` [L', H] slots (bool: the marked heads by one),
        freeing blocks that empty (decode-time eviction first moves the last slot into the
        evicted one's place; a scoring pass goes whole)."""
        s = self.seqs[seq_id]
        layers = layers or slice(0, self.num_layers)
        self._shrink(seq_id, layers, s.lengths[layers] - drop.to(HOST, torch.int64))
        self._refresh_key_bounds(s, layers)

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy every slot field from flat slots `src` to flat slots `dst` (on any device)."""
        device = self.pool.device
        src, dst = self.pool.slot_index(src.to(device)), self.pool.slot_index(dst.to(device))
        for field in self.pool.fields.values():
            field[dst] = field[src]  # advanced indexing reads a copy first, so overlaps are safe

    def _refresh_key_bounds(self, s: SequenceKV, layers: slice):
        """Recompute the key bounds of the heads' blocks from the keys they now hold (after slots
        moved between blocks)."""
        if not self.pool.block_fields:
            return
        tables, lengths = s.tables[layers], s.lengths[layers]
        width = int(s.num_blocks[layers].max())
        if width == 0:
            return
        device = self.pool.device
        tables, lengths = tables[..., :width].to(device), lengths.to(device)
        keys = gather_blocks(self.pool.k, tables).float()                       # [L', H, S, D]
        held = (torch.arange(keys.shape[2], device=device) < lengths[..., None])[..., None]
        per_block = (*tables.shape, self.block_size, keys.shape[-1])
        kmin = keys.masked_fill(~held, float("inf")).view(per_block).amin(-2)
        kmax = keys.masked_fill(~held, float("-inf")).view(per_block).amax(-2)
        owned = tables >= 0
        self.pool.block_fields["kmin"][tables[owned]] = kmin[owned].to(self.pool.dtype)
        self.pool.block_fields["kmax"][tables[owned]] = kmax[owned].to(self.pool.dtype)

    def _shrink(self, seq_id: int, layers: slice, lengths: torch.Tensor):
        """Set the heads' lengths and give back the blocks past what they now need."""
        s = self.seqs[seq_id]
        tables = s.tables[layers]
        need = self.blocks_for(lengths)
        cols = torch.arange(tables.shape[-1], device=HOST)
        tail = (cols >= need[..., None]) & (cols < s.num_blocks[layers][..., None])
        if self.prefix is not None and bool(self.prefix.shared[tables[tail]].any()):
            raise RuntimeError("a shared prefix block would be freed by a compaction; the engine must not "
                               "share the blocks of a method that changes held blocks")
        self.pool.free(tables[tail])
        tables[tail] = -1
        self.mirror.record_freed(seq_id, tail, layers.indices(self.num_layers)[0])
        s.num_blocks[layers] = need
        s.lengths[layers] = lengths

    def settle(self, seq_id: int, layers: slice | None = None):
        """Called after a layer's prefill and after every decode step: a store that changes what
        it holds once tokens are cached (quantization) does it here. Full precision: nothing."""

    # --- accounting -------------------------------------------------------------------

    def seq_bytes(self, seq_id: int) -> int:
        return int(self.seqs[seq_id].num_blocks.sum()) * self.pool.bytes_per_block

    def read_bytes(self, lengths: torch.Tensor, quantized: torch.Tensor | None = None) -> torch.Tensor:
        """KV bytes a decode attention call reads for heads holding `lengths` tokens: whole blocks
        of K, V and positions. A 0-d tensor on the lengths' device: a decode step adds one up per
        layer, and reading it on the host would make each layer wait for the GPU."""
        return self.blocks_for(lengths).sum() * (self.block_size * self.token_bytes())

    def token_bytes(self) -> int:
        """Bytes one token of one head takes in full precision: K, V and its int32 position."""
        return 2 * self.pool.head_dim * self.pool.dtype.itemsize + 4

    def theoretical_bytes(self, seq_id: int) -> int:
        """What the sequence's tokens take with no block rounding: the figure `seq_bytes` (which
        counts whole blocks) is measured against."""
        return int(self.seqs[seq_id].lengths.sum()) * self.token_bytes()

    def uncompressed_bytes(self, tokens: int) -> int:
        """What `full` holds for a sequence of `tokens` tokens: every kv-head's K, V and positions, in
        full-precision blocks of `full_block_size` tokens."""
        blocks = -(-tokens // self.full_block_size)
        per_token = 2 * self.model_head_dim * self.pool.dtype.itemsize + 4
        return self.num_layers * self.model_kv_heads * blocks * self.full_block_size * per_token

    @property
    def used_bytes(self) -> int:
        return self.pool.used_bytes

    host_used_bytes = 0  # a host tier's (host_tier.py)


@dataclass
class DecodeGroup:
    host: list[torch.Tensor]  # on the host, for the step's one copy: members, the tables' rows, lengths
    widths: tuple[int, ...]   # the columns of the group's tables in each mirror (a tier each)


GROUP_SLACK = 1.5  # padding waste a decode group may carry (the longest / the shortest member)


def length_groups(blocks: list[int], slack: float = GROUP_SLACK) -> list[list[int]]:
    """Indices grouped so that within a group the longest holds at most `slack` times the
    blocks of the shortest (sorted by length)."""
    order = sorted(range(len(blocks)), key=blocks.__getitem__)
    groups = [[order[0]]]
    for i in order[1:]:
        if blocks[i] > slack * blocks[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups


def grown_to(tables: torch.Tensor, columns: int) -> torch.Tensor:
    """`tables` [L, H, capacity], widened (padded with -1, at least doubling) to hold `columns`."""
    if columns <= tables.shape[-1]:
        return tables
    grown = torch.full((*tables.shape[:2], max(columns, 2 * tables.shape[-1])), -1, dtype=torch.int64, device=HOST)
    grown[..., :tables.shape[-1]] = tables
    return grown


def place_blocks(tables: torch.Tensor, num_blocks: torch.Tensor, extra: torch.Tensor, ids: torch.Tensor):
    """Write new block ids into `tables` [L', H, capacity] (a view, written in place): head (l, h)
    gets `extra[l, h]` of them, taken from `ids` in order, at columns num_blocks[l, h] onwards.
    -> where each id went: (flat head l * H + h, column), each [len(ids)]."""
    rows = torch.repeat_interleave(torch.arange(extra.numel(), device=HOST), extra.flatten())
    first = torch.cumsum(extra.flatten(), 0) - extra.flatten()
    cols = num_blocks.flatten()[rows] + torch.arange(len(ids), device=HOST) - first[rows]
    tables.reshape(-1, tables.shape[-1])[rows, cols] = ids
    return rows, cols


__all__ = ["PagedKVCache", "SequenceKV", "DecodeGroup", "OutOfBlocks"]
