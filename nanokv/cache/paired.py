"""PairedKVCache: pairs of layers that keep one merged copy of the prompt (MiniCache).

A pair (a, b), a < b, stores its prompt once. At the end of a sequence's prefill, right after
layer b's attention has run over its own prompt K/V, the method (nanokv/methods/minicache.py)
merges the two layers' prompt K/V (`pair_prompt`) and the cache stores the result (`store_merged`):

- layer a holds every token, in its own blocks as any layer does. A merged prompt token's slot
  holds the merged direction times a's magnitude, e |x_a|, so layer a's attention reads its
  blocks as they are; a retained token's slot, and every token after the prompt, its own K/V.
  The slot fields k_mag_b / v_mag_b of a merged token hold layer b's magnitudes; elsewhere 0
  (a new token's fields start at 0: PagedKVCache.write).
- layer b holds, in its own blocks, its retained prompt tokens and every token after the prompt
  (decode, a question after a compressed context, a recompute's generated tokens): the rest of
  its prompt is compacted away and its blocks go back to the pool.
- layer b's attention (`attend_decode`, `attend_prefill`) reads both: a's merged
  slots restored with b's magnitudes, x / |x| * mag_b (a's other slots masked out), and b's own
  slots, in one softmax (kernels.paired_attention: on CUDA a decode kernel that restores each
  slot as it loads, nanokv/kernels/two_part_decode.py).

Block tables, lengths, preemption and scheduling are PagedKVCache's: b is a layer whose heads
keep fewer tokens after prefill (kept_after_prefill), as under any eviction method.
"""

from __future__ import annotations

import torch

from nanokv.kernels.reference import paired_keys
from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.pool import HOST


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

    def pair_of(self, layer: int) -> int | None:
        return self.first_of.get(layer)

    def pair_prompt(self, seq_id: int, b: int, n: int):
        """The first n tokens (the prompt) of layers a and b of a just-prefilled sequence: what the
        method merges -> k_a, v_a, k_b, v_b [H, n, D]."""
        a = self.first_of[b]
        return tuple(self.read_prompt(seq_id, layer, n, ("k", "v"))[name] for layer in (a, b) for name in ("k", "v"))

    def store_merged(self, seq_id: int, b: int, n: int, merged: dict[str, torch.Tensor]):
        """Write what the method made of the pair's prompt (`merge_pair`): layer a's K, V and b's
        magnitudes, and compact layer b to the tokens it keeps of its own (and any after the prompt)."""
        a, s = self.first_of[b], self.seqs[seq_id]
        self.write_prompt(seq_id, a, n, {name: merged[name] for name in ("k", "v", *self.MAGNITUDES)})
        self._refresh_key_bounds(s, slice(a, a + 1))
        keep = merged["keep"].to(HOST)  # block tables live on the host
        after = torch.ones(self.num_kv_heads, int(s.lengths[b].max()) - n, dtype=torch.bool, device=HOST)
        self.compact(seq_id, torch.cat([keep, after], dim=1)[None], layers=slice(b, b + 1))

    # --- attention at layer b: a's merged slots restored with b's magnitudes, then b's own ---

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        a = self.first_of.get(layer)
        if a is None:
            return super().attend_decode(layer, q, positions, group, sliding_window)
        tables, lengths = group
        nbytes = self.read_bytes(lengths[a]) + self.read_bytes(lengths[layer]) + \
            self.blocks_for(lengths[a]).sum() * (self.block_size * self.magnitude_bytes())
        out = self._attend(q[:, None], positions[:, None], tables[a], lengths[a], tables[layer], lengths[layer],
                           sliding_window)
        return out[:, 0], nbytes

    def attend_prefill(self, seq_id: int, layer: int, q, q_pos, sliding_window, column_sums: bool = False,
                       merged: bool = True, new_kv: tuple | None = None):
        """At layer b, `merged`: over read_second; else over b's own K/V alone (the prompt, before
        the pair is merged)."""
        a = self.first_of.get(layer)
        if a is None or not merged:
            return super().attend_prefill(seq_id, layer, q, q_pos, sliding_window, column_sums)
        return self._attend(q[None], q_pos[None], *self.held(seq_id, a), *self.held(seq_id, layer), sliding_window)[0], None

    def _attend(self, q, q_pos, tables_a, lengths_a, tables_b, lengths_b, sliding_window):
        pool = self.pool
        return self.kernels.paired_attention(q, q_pos, pool.k, pool.v, pool.pos, *self.magnitudes(), tables_a,
                                             lengths_a, tables_b, lengths_b, sliding_window)

    # --- reading layer b ---------------------------------------------------------------

    def magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer b's K and V magnitudes [num_blocks, block_size], slot fields of the pool."""
        return tuple(self.pool.fields[name] for name in self.MAGNITUDES)

    def read_second(self, tables_a, lengths_a, tables_b, lengths_b):
        """What layer b attends over, gathered (reference.paired_keys): a's slots restored with
        b's magnitudes, then b's own. -> keys, values [B, H, S, D], positions [B, H, S], lengths [B, H]."""
        pool = self.pool
        return paired_keys(pool.k, pool.v, pool.pos, *self.magnitudes(), tables_a, lengths_a, tables_b, lengths_b)

    # --- accounting --------------------------------------------------------------------

    def magnitude_bytes(self) -> int:
        """Bytes of b's two magnitudes, which every slot of the pool carries."""
        return sum(self.pool.fields[name].element_size() for name in self.MAGNITUDES)

    def theoretical_bytes(self, seq_id: int) -> int:
        """What the sequence's tokens take with no block rounding: K, V, position and b's two
        magnitudes per slot held (methods/minicache.py compares it with the paper's figure)."""
        return int(self.seqs[seq_id].lengths.sum()) * (self.token_bytes() + self.magnitude_bytes())

