"""CacheAttention: the `attention` callable the model calls, for one forward step over a
PagedKVCache (see models/llama.py for the contract).

A step is either a prefill (one or more sequences, each with a chunk of new tokens) or a
decode (every sequence with exactly one new token). The slots of all new tokens are
reserved once, before layer 0; each layer then writes its K/V there and attends:
decode in a few batched calls over groups of sequences of similar length, prefill one
sequence at a time (each one is a large matmul already).
"""

from __future__ import annotations

import torch

from kernels.reference import gather_blocks, paged_attention
from nanokv.cache.kv_cache import PagedKVCache

PREFILL_QUERY_CHUNK = 1024
GROUP_SLACK = 1.5  # padding waste a decode group may carry (the longest / the shortest member)


class CacheAttention:
    def __init__(self, cache: PagedKVCache, seq_ids: list[int], query_lens: list[int], positions: torch.Tensor,
                 method=None, prompt_lens: list[int] | None = None):
        self.cache, self.seq_ids, self.query_lens = cache, seq_ids, query_lens
        # a prefill-time compression method (nanokv/methods), applied per layer after attention to
        # each sequence's prompt (a recompute after preemption also carries generated tokens:
        # those are kept)
        self.method = method if method is not None and method.compresses else None
        self.prompt_lens = prompt_lens or query_lens
        self.positions = positions                                        # [T] all new tokens
        self.is_decode = all(n == 1 for n in query_lens)
        device = cache.pool.device
        slots = [cache.append_slots(s, n) for s, n in zip(seq_ids, query_lens)]
        self.slots = torch.cat(slots, dim=-1).to(device)                  # [L, H, T]
        seqs = [cache.seqs[s] for s in seq_ids]
        blocks = [int(s.num_blocks.max()) for s in seqs]
        # Each group is attended in one call, its tables padded to its longest member. Decode
        # groups sequences of similar length, so a short one is not padded to the longest of
        # the batch; prefill runs one sequence at a time.
        groups = length_groups(blocks) if self.is_decode else [[i] for i in range(len(seqs))]
        self.groups = []
        for members in groups:
            width = max(blocks[i] for i in members)
            tables = torch.stack([pad_blocks(seqs[i].tables, width) for i in members], dim=1)  # [L, b, H, nb]
            lengths = torch.stack([seqs[i].lengths for i in members], dim=1)             # [L, b, H]
            self.groups.append((torch.tensor(members, device=device), tables.to(device), lengths.to(device)))
        self.q_pos = positions.split(query_lens)

    def __call__(self, layer, q, k, v, sliding_window):
        pool, workspace = self.cache.pool, self.cache.workspace
        self.cache.write(self.slots[layer], k, v, self.positions)
        if self.is_decode:
            out = torch.empty_like(q)
            for members, tables, lengths in self.groups:
                out[members] = paged_attention(q[members, None], self.positions[members, None], pool.k, pool.v,
                                               pool.pos, tables[layer], lengths[layer], sliding_window, workspace)[:, 0]
            return out
        outs = []
        for i, ((_, tables, lengths), q_i, pos_i) in enumerate(zip(self.groups, q.split(self.query_lens), self.q_pos)):
            if self.method is None:
                outs.append(self._prefill(q_i, pos_i, tables[layer], lengths[layer], sliding_window))
                continue
            # The prompt attends over itself, then is compressed. Tokens generated before a
            # preemption (recompute) then attend over the compressed prompt, as they did the
            # first time, so the recomputed cache is the one the sequence had.
            n = self.prompt_lens[i]
            outs.append(self._prefill(q_i[:n], pos_i[:n], tables[layer], lengths[layer], sliding_window))
            self._compress(layer, self.seq_ids[i], q_i[:n])
            if n < len(q_i):
                s = self.cache.seqs[self.seq_ids[i]]
                compacted = s.tables[layer:layer + 1, :, :int(s.num_blocks[layer].max())].to(pool.device)
                outs.append(self._prefill(q_i[n:], pos_i[n:], compacted, s.lengths[layer:layer + 1].to(pool.device),
                                          sliding_window))
        return torch.cat(outs)

    def _prefill(self, q, q_pos, tables, lengths, sliding_window):
        """One sequence's queries [T, Hq, D] over its cached KV (tables [1, H, nb], lengths [1, H]),
        in chunks: the score matrix of a long prompt would not fit at once."""
        pool = self.cache.pool
        return torch.cat([paged_attention(q_c[None], pos_c[None], pool.k, pool.v, pool.pos, tables, lengths,
                                          sliding_window, self.cache.workspace)[0]
                          for q_c, pos_c in zip(q.split(PREFILL_QUERY_CHUNK), q_pos.split(PREFILL_QUERY_CHUNK))])

    def _compress(self, layer: int, seq_id: int, queries: torch.Tensor):
        """Let the method pick what layer `layer` of a just-prefilled sequence keeps; compact it.
        Nothing else in this forward pass reads this layer's KV again."""
        from nanokv.methods.base import PrefillView

        pool, s = self.cache.pool, self.cache.seqs[seq_id]
        n, held = len(queries), int(s.lengths[layer].max())
        tables = s.tables[layer, :, :int(s.num_blocks[layer].max())]
        keys = gather_blocks(pool.k, tables)[:, :n]                             # [H, S, D] the prompt's
        positions = gather_blocks(pool.pos, tables[:1])[0, :n]                 # [S]
        view = PrefillView(layer, self.cache.num_layers, queries, keys, positions)
        keep = self.method.keep_mask(view)
        if keep is not None:
            keep = keep.cpu()  # block tables live on the CPU
            generated = torch.ones(keep.shape[0], held - n, dtype=torch.bool, device=keep.device)
            self.cache.compact(seq_id, torch.cat([keep, generated], dim=1)[None], layers=slice(layer, layer + 1))


def pad_blocks(tables: torch.Tensor, width: int) -> torch.Tensor:
    """A sequence's tables cut or padded (with -1) to `width` blocks."""
    return torch.nn.functional.pad(tables[..., :width], (0, max(0, width - tables.shape[-1])), value=-1)


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
