"""ModelRunner: turns one scheduled step into tensors, runs the model over the cache, samples.

Prefill feeds every token of each admitted sequence (its prompt, plus what it had generated
before a preemption: that is the recompute). Decode feeds each running sequence's last
sampled token, the one token it has that the cache does not hold yet.

A method's scoring passes (KVzip) ride in the prefill after the prompt, each at the positions
after it. When a method scores with such passes or trims earlier layers again (CAKE), what
follows the compressed part (a question, a recompute's tokens) waits for a second forward pass
over the finished cache (nanokv/methods/base.py).
"""

from __future__ import annotations

import torch

from nanokv.cache import PagedKVCache
from nanokv.cache.pool import HOST
from nanokv.engine.attention import StepAttention
from nanokv.engine.cuda_graphs import DecodeGraphs
from nanokv.engine.upload import HostToDevice
from nanokv.engine.sequence import Sequence
from nanokv.sampling import sample


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, device, method=None, graphs: DecodeGraphs | None = None):
        """`graphs`: replay decode steps as CUDA graphs (engine/cuda_graphs.py); None: eagerly."""
        self.model, self.cache, self.device, self.method, self.graphs = model, cache, device, method, graphs
        self.send = HostToDevice(device)  # a decode step's host inputs, in one copy
        self.graph_steps = self.eager_steps = 0  # decode steps replayed, and run eagerly
        self.read_states: dict[int, dict] = {}  # a query-aware reader's state per sequence (base.py: ReadStep)
        if method is not None and method.evicts_during_decode:
            cache.reserve_scratch()  # its decode steps write there (attention.py: _evict); now, before any step

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        if not is_prefill:
            # the sequences of this step keep theirs; one that left (finished, preempted) drops it
            self.read_states = {s.id: self.read_states.get(s.id, {}) for s in seqs}
            # on the host: StepAttention sends them with the step's block tables
            ids = torch.tensor([s.last_token_id for s in seqs], device=HOST)
            positions = torch.tensor([len(s) - 1 for s in seqs], device=HOST)
            hidden, attention = self._forward(seqs, [1] * len(seqs), ids, positions, finish=False)
            tokens = self._sample(seqs, hidden)
            attention.finish()  # after the tokens are read: what it reads back (evictions) has no GPU to wait for
            for s in seqs:
                s.num_cached += 1
            return tokens

        for s in seqs:  # a prefill (a recompute) starts a reader's state afresh
            self.read_states.pop(s.id, None)
        # A method that re-trims earlier layers, or scores with a pass of its own, finishes the
        # compressed part first; what follows it then runs over the cache as it ends (base.py).
        method = self.method if self.method is not None and self.method.compresses else None
        split = [method is not None and (method.trims_earlier_layers or bool(s.scoring_passes)) for s in seqs]
        query_lens, ids, positions, last = [], [], [], []
        for s, later in zip(seqs, split):
            n = s.compress_len
            head = s.all_token_ids[:n] if later else s.all_token_ids
            ids += head + sum(s.scoring_passes, [])
            # each scoring pass sits right after the prompt, as if it were the only one
            positions += [torch.arange(len(head), device=self.device)] + [torch.arange(n, n + len(p), device=self.device)
                                                                       for p in s.scoring_passes]
            last.append(sum(query_lens) + len(head) - 1)  # the prompt's last token, before any pass
            query_lens.append(len(head) + sum(len(p) for p in s.scoring_passes))
        hidden = self._forward(seqs, query_lens, ids, torch.cat(positions))[last]
        rest = [i for i, (s, later) in enumerate(zip(seqs, split)) if later and len(s) > s.compress_len]
        if rest:
            tails = [seqs[i].all_token_ids[seqs[i].compress_len:] for i in rest]
            tail_positions = torch.cat([torch.arange(seqs[i].compress_len, len(seqs[i]), device=self.device) for i in rest])
            tail_hidden = self._forward([seqs[i] for i in rest], [len(t) for t in tails], sum(tails, []),
                                        tail_positions, compress=False)
            hidden[rest] = tail_hidden[torch.tensor([len(t) for t in tails], device=self.device).cumsum(0) - 1]
        for s in seqs:
            s.num_cached = len(s)
        return self._sample(seqs, hidden)

    def _forward(self, seqs, query_lens, ids, positions, compress=True, finish=True):
        """The model over the cache for these sequences' new tokens -> hidden states [T, hidden]
        (with finish=False also the step's StepAttention, for the caller to finish).
        ids: a list (prefill), or with positions host tensors (decode)."""
        if isinstance(ids, list):
            ids = torch.tensor(ids, device=self.device)
        attention = StepAttention(self.cache, [s.id for s in seqs], query_lens, positions, self.method,
                                   [s.compress_len for s in seqs], ids,
                                   [[len(p) for p in s.scoring_passes] for s in seqs] if compress else None, compress,
                                   self.send, self.read_states, getattr(self.model, "inv_freq", None),
                                   lambda i: seqs[i].all_token_ids)
        if attention.is_decode and self.graphs is not None and self.graphs.takes(attention):
            hidden = self.graphs.forward(attention)
            self.graph_steps += self.graphs.replayed
            self.eager_steps += not self.graphs.replayed
        else:
            hidden = self.model(attention.ids, attention.positions, attention)
            self.eager_steps += attention.is_decode
        # decode: the KV bytes attention read, all layers; a tensor on the device, which the caller
        # reads after the step, when sampling has waited for the GPU anyway
        self.last_bytes_read = attention.bytes_read
        self.last_bytes_moved = attention.bytes_moved  # recalled from a host tier (host_tier.py)
        if not finish:
            return hidden, attention
        attention.finish()
        return hidden

    def _sample(self, seqs, hidden):
        """Each sequence's next token, from its row of `hidden` [len(seqs), hidden]."""
        logits = self.model.compute_logits(hidden)
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
