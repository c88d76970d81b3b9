"""CacheAttention: the `attention` callable the model calls, for one forward step over a
PagedKVCache (see models/llama.py for the contract).

A step is either a prefill (one or more sequences, each with a chunk of new tokens) or a
decode (every sequence with exactly one new token). The slots of all new tokens are
reserved once, before layer 0; each layer then writes its K/V there and attends:
decode in one batched call over all sequences, prefill one sequence at a time (each one is
a large matmul already).
"""

from __future__ import annotations

import torch

from kernels.reference import paged_attention
from nanokv.cache.kv_cache import PagedKVCache

PREFILL_QUERY_CHUNK = 1024


class CacheAttention:
    def __init__(self, cache: PagedKVCache, seq_ids: list[int], query_lens: list[int], positions: torch.Tensor):
        self.cache, self.seq_ids, self.query_lens = cache, seq_ids, query_lens
        self.positions = positions                                        # [T] all new tokens
        self.is_decode = all(n == 1 for n in query_lens)
        slots = [cache.append_slots(s, n) for s, n in zip(seq_ids, query_lens)]
        device = cache.pool.device
        self.slots = torch.cat(slots, dim=-1).to(device)                  # [L, H, T]
        seqs = [cache.seqs[s] for s in seq_ids]
        width = max(s.tables.shape[-1] for s in seqs)
        self.tables = torch.stack([torch.nn.functional.pad(s.tables, (0, width - s.tables.shape[-1]), value=-1)
                                   for s in seqs], dim=1).to(device)      # [L, B, H, nb]
        self.lengths = torch.stack([s.lengths for s in seqs], dim=1).to(device)  # [L, B, H]
        self.q_pos = positions.split(query_lens)

    def __call__(self, layer, q, k, v, sliding_window):
        pool = self.cache.pool
        self.cache.write(self.slots[layer], k, v, self.positions)
        tables, lengths = self.tables[layer], self.lengths[layer]
        if self.is_decode:
            out = paged_attention(q[:, None], self.positions[:, None], pool.k, pool.v, pool.pos,
                                  tables, lengths, sliding_window)
            return out[:, 0]
        outs = []
        for i, (q_i, pos_i) in enumerate(zip(q.split(self.query_lens), self.q_pos)):
            # queries in chunks: the score matrix of a long prompt would not fit at once
            for q_c, pos_c in zip(q_i.split(PREFILL_QUERY_CHUNK), pos_i.split(PREFILL_QUERY_CHUNK)):
                outs.append(paged_attention(q_c[None], pos_c[None], pool.k, pool.v, pool.pos,
                                            tables[i:i + 1], lengths[i:i + 1], sliding_window)[0])
        return torch.cat(outs)
