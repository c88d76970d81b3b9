"""PairedKVCache: pairs of layers that keep one merged copy of the prompt (MiniCache).

A pair (a, b), a < b, stores its prompt once. At the end of a sequence's prefill, right after
layer b's attention has run over its own prompt K/V, the method (nanokv/methods/minicache.py)
merges the two layers' prompt K/V and the cache stores the result (`merge_pair`):

- layer a holds every token, in its own blocks as any layer does. A merged prompt token's slot
  holds the merged direction times a's magnitude, e |x_a|, so layer a's attention reads its
  blocks as they are; a retained token's slot, and every token after the prompt, its own K/V.
  The slot fields k_mag_b / v_mag_b of a merged token hold layer b's magnitudes; elsewhere 0
  (a new token's fields start at 0: PagedKVCache.write).
- layer b holds, in its own blocks, its retained prompt tokens and every token after the prompt
  (decode, a question after a compressed context, a recompute's generated tokens): the rest of
  its prompt is compacted away and its blocks go back to the pool.
- layer b's attention (`attend_second`, what CacheAttention calls for it) reads both: a's merged
  slots restored with b's magnitudes, x / |x| * mag_b (a's other slots masked out by giving
  them a position later than any query), and b's own slots.

Block tables, lengths, preemption and scheduling are PagedKVCache's: b is a layer whose heads
keep fewer tokens after prefill (kept_after_prefill), as under any eviction method.
"""

from __future__ import annotations

import torch

from nanokv.kernels.reference import attend, gather_blocks
from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.pool import HOST

HIDDEN = torch.iinfo(torch.int32).max  # a position no query reaches: the slot is masked


class PairedKVCache(PagedKVCache):
    pairs: list[tuple[int, int]] = []  # (a, b), set by pair_layers
    first_of: dict[int, int] = {}      # layer b -> layer a of its pair
    MAGNITUDES = ("k_mag_b", "v_mag_b")

    def pair_layers(self, pairs: list[tuple[int, int]]):
        """Pair layers (a, b), a < b, each layer in at most one pair. Before any sequence is added."""
        layers = [layer for pair in pairs for layer in pair]
        if not pairs or len(set(layers)) != len(layers) or any(not 0 <= a < b < self.num_layers for a, b in pairs):
            raise ValueError(f"layer pairs must be (a, b) with 0 <= a < b < {self.num_layers}, each layer in one "
                             f"pair at most, got {pairs}")
        if any(self.sources[layer] != layer for layer in layers):
            raise ValueError("a paired layer cannot share another layer's KV")
        self.pairs = [tuple(p) for p in pairs]
        self.first_of = {b: a for a, b in self.pairs}

    # --- the merge ---------------------------------------------------------------------

    def merge_pair(self, seq_id: int, b: int, n: int, method):
        """Merge the first n tokens (the prompt) of layers a and b of a just-prefilled sequence:
        the method works out what they become (`method.merge_pair`), the cache writes layer a and
        compacts layer b to the tokens it keeps of its own (and any tokens after the prompt)."""
        a, s, pool = self.first_of[b], self.seqs[seq_id], self.pool
        tables = {layer: s.tables[layer, :, :int(s.num_blocks[layer].max())].to(pool.device) for layer in (a, b)}
        k_a, v_a, k_b, v_b = (gather_blocks(field, tables[layer])[:, :n]
                              for layer in (a, b) for field in (pool.k, pool.v))
        merged = method.merge_pair(k_a, v_a, k_b, v_b)
        H = self.num_kv_heads
        prompt = self.flat_slots(tables[a], torch.arange(n, device=pool.device).expand(H, n))
        for name in ("k", "v", *self.MAGNITUDES):
            pool.fields[name][pool.slot_index(prompt)] = merged[name].to(pool.fields[name].dtype)
        self._refresh_key_bounds(s, slice(a, a + 1))
        keep = merged["keep"].to(HOST)  # block tables live on the host
        after = torch.ones(H, int(s.lengths[b].max()) - n, dtype=torch.bool, device=HOST)
        self.compact(seq_id, torch.cat([keep, after], dim=1)[None], layers=slice(b, b + 1))

    # --- reading layer b ---------------------------------------------------------------

    def read_second(self, tables_a, lengths_a, tables_b, lengths_b):
        """What layer b attends over, for sequences whose tables at a and b are tables_a, tables_b
        [B, H, nb] (lengths [B, H]): a's slots (restored with b's magnitudes; those b does not
        read, and any past a's length, at a position no query reaches), then b's own.
        -> keys, values [B, H, S, D] (the pool's dtype), positions [B, H, S], lengths [B, H]."""
        pool, bs = self.pool, self.block_size
        parts = []
        for tables, lengths, restore in ((tables_a, lengths_a, True), (tables_b, lengths_b, False)):
            tables = tables[..., :int((lengths.max() + bs - 1) // bs)]
            k, v, pos = (gather_blocks(f, tables) for f in (pool.k, pool.v, pool.pos))
            held = torch.arange(k.shape[2], device=k.device) < lengths[..., None]
            if restore:
                k_mag, v_mag = (gather_blocks(pool.fields[name], tables) for name in self.MAGNITUDES)
                held = held & (k_mag > 0)
                k, v = restored(k, k_mag), restored(v, v_mag)
            parts.append((k, v, pos.masked_fill(~held, HIDDEN)))
        keys, values, positions = (torch.cat(x, dim=2) for x in zip(*parts))
        return keys, values, positions, torch.full_like(lengths_b, keys.shape[2])

    # --- accounting --------------------------------------------------------------------

    def magnitude_bytes(self) -> int:
        """Bytes of b's two magnitudes, which every slot of the pool carries."""
        return sum(self.pool.fields[name].element_size() for name in self.MAGNITUDES)

    def theoretical_bytes(self, seq_id: int) -> int:
        """What the sequence's tokens take with no block rounding: K, V, position and b's two
        magnitudes per slot held (methods/minicache.py compares it with the paper's figure)."""
        return int(self.seqs[seq_id].lengths.sum()) * (self.token_bytes() + self.magnitude_bytes())

    def uncompressed_bytes(self, tokens: int) -> int:
        """What `full` holds for `tokens` tokens: K, V and positions in every layer's blocks (no
        magnitudes)."""
        return self.num_layers * self.num_kv_heads * self.blocks_for(tokens) * self.block_size * self.token_bytes()


def restored(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Vectors x [..., D] with their length set to `magnitude` [...] (0 where x is 0)."""
    xf = x.float()
    return (xf * (magnitude / xf.norm(dim=-1).clamp(min=1e-30))[..., None]).to(x.dtype)


def attend_second(att, layer: int, q, k, v, sliding_window):
    """CacheAttention (att) at layer b of a pair: write the new tokens into b's blocks, attend.
    In a prefill with the method the prompt first attends over b's own K/V whole, and then the
    pair is merged; what follows the prompt, and every decode step, attends over read_second."""
    cache, device = att.cache, att.cache.pool.device
    a = cache.first_of[layer]
    if att.is_decode:
        cache.write(att.slots[layer], k, v, att.positions)
        out = torch.empty_like(q)
        for members, tables, lengths in att.groups:
            att.bytes_read += cache.read_bytes(lengths[a]) + cache.read_bytes(lengths[layer]) + \
                int(cache.blocks_for(lengths[a]).sum()) * cache.block_size * cache.magnitude_bytes()
            keys, values, k_pos, held = cache.read_second(tables[a], lengths[a], tables[layer], lengths[layer])
            out[members] = attend(q[members][:, None], att.positions[members][:, None], keys, values, k_pos, held,
                                  sliding_window)[:, 0]
        return out
    outs = []
    new = zip(att.seq_ids, q.split(att.query_lens), k.split(att.query_lens), v.split(att.query_lens), att.q_pos)
    for i, (seq_id, q_i, k_i, v_i, pos_i) in enumerate(new):
        slots = cache.append_slots(seq_id, len(q_i), layers=slice(layer, layer + 1))[0]
        cache.write(slots.to(device), k_i, v_i, pos_i)
        n = att.compress_lens[i] if att.method is not None else 0
        if n:  # the prompt over its own K/V, then merged (prefill starts from an empty cache)
            outs.append(att._prefill(q_i[:n], pos_i[:n], *att._held(seq_id, layer), sliding_window)[0])
            cache.merge_pair(seq_id, layer, n, att.method)
        if n < len(q_i):
            keys, values, k_pos, held = cache.read_second(*att._held(seq_id, a), *att._held(seq_id, layer))
            outs.append(attend(q_i[n:][None], pos_i[n:][None], keys, values, k_pos, held, sliding_window)[0])
    return torch.cat(outs)
