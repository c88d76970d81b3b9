"""ModelRunner: turns one scheduled step into tensors, runs the model over the cache, samples.

Prefill feeds every token of each admitted sequence (its prompt, plus what it had generated
before a preemption: that is the recompute). Decode feeds each running sequence's last
sampled token, the one token it has that the cache does not hold yet.
"""

from __future__ import annotations

import torch

from nanokv.cache import CacheAttention, PagedKVCache
from nanokv.engine.sequence import Sequence
from nanokv.sampling import sample


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, device, method=None):
        self.model, self.cache, self.device, self.method = model, cache, device, method

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        if is_prefill:
            query_lens = [len(s) for s in seqs]
            ids = [t for s in seqs for t in s.all_token_ids]
            positions = torch.cat([torch.arange(n) for n in query_lens])
        else:
            query_lens = [1] * len(seqs)
            ids = [s.last_token_id for s in seqs]
            positions = torch.tensor([len(s) - 1 for s in seqs])
        ids = torch.tensor(ids, device=self.device)
        positions = positions.to(self.device)
        attention = CacheAttention(self.cache, [s.id for s in seqs], query_lens, positions, self.method,
                                   [s.compress_len for s in seqs], ids)
        for s, n in zip(seqs, query_lens):
            s.num_cached = n if is_prefill else s.num_cached + 1
        hidden = self.model(ids, positions, attention)
        attention.finish()
        self.last_bytes_read = attention.bytes_read  # decode: the KV bytes attention read, all layers
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last])
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
