"""ModelRunner: turns one scheduled step into tensors, runs the model over the cache, samples.

Prefill feeds every token of each admitted sequence (its prompt, plus what it had generated
before a preemption: that is the recompute). Decode feeds each running sequence's last
sampled token, the one token it has that the cache does not hold yet.

A method's scoring passes (KVzip) ride in the prefill after the prompt, each at the positions
after it. When a method scores with such passes or trims earlier layers again (CAKE), what
follows the compressed part (a question, a recompute's tokens) waits for a second forward pass
over the finished cache (nanokv/methods/base.py). So does it for a chunked method (InfiniPot,
CItruS: `prefill_chunk`), whose compressed part runs a chunk per forward pass, each over what the
earlier chunks left.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from nanokv.cache import PagedKVCache
from nanokv.cache.pool import HOST
from nanokv.engine.attention import StepAttention
from nanokv.engine.blending import Blend, ChunksAlone
from nanokv.engine.merging_prefill import MergingPrefill
from nanokv.engine.cuda_graphs import DecodeGraphs
from nanokv.engine.request_methods import RequestMethods
from nanokv.engine.upload import HostToDevice
from nanokv.engine.sequence import Sequence
from nanokv.sampling import sample


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, device, method=None, graphs: DecodeGraphs | None = None,
                 ranks=None):
        """`graphs`: replay decode steps as CUDA graphs (engine/cuda_graphs.py); None: eagerly.
        `ranks`: tensor parallelism's group (nanokv/distributed.py), None on one process."""
        self.model, self.cache, self.device, self.graphs = model, cache, device, graphs
        # the engine's method; `method` is the running step's: a sequence may carry its own (Sequence.method)
        self.default_method = self.method = method
        self.ranks = ranks
        self.send = HostToDevice(device)  # a decode step's host inputs, in one copy
        self.graph_steps = self.eager_steps = 0  # decode steps replayed, and run eagerly
        self.read_states: dict[int, dict] = {}  # a query-aware reader's state per sequence (base.py: ReadStep)
        # prompt attention FLOPs so far: computed (every prefill pass's), and what a dense prefill of
        # the same tokens computes (full's), for LLM.stats
        self.prefill_flops = self.dense_prefill_flops = 0
        self.last_blend = None  # a blending method's last blend pass (engine/blending.py: what it recomputed)
        self.last_merge = None  # a merging method's last prefill (engine/merging_prefill.py: what it kept)
        self.sharing = None  # prefix caching (engine/prefix_sharing.py): LLM sets it when enabled
        if method is not None and method.evicts_during_decode:
            cache.reserve_scratch()  # its decode steps write there (attention.py: _evict); now, before any step

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        # the scheduler gives a step sequences of one method, or of methods that decode alike
        self.method = seqs[0].method if seqs[0].method is not None else self.default_method
        if not is_prefill:
            for s in seqs:  # a sequence keeps its state until it is released (finished, aborted)
                self.read_states.setdefault(s.id, {})
            # on the host: StepAttention sends them with the step's block tables
            ids = torch.tensor([s.last_token_id for s in seqs], device=HOST)
            positions = torch.tensor([len(s) - 1 - s.position_shift for s in seqs], device=HOST)
            hidden, attention = self._forward(seqs, [1] * len(seqs), ids, positions, finish=False)
            tokens = self._sample(seqs, hidden)
            attention.finish()  # after the tokens are read: what it reads back (evictions) has no GPU to wait for
            for s in seqs:
                s.num_cached += 1
            return tokens

        cfg = self.model.cfg
        for s in seqs:  # a prefill (a recompute) starts a reader's state afresh
            self.read_states.pop(s.id, None)
            self.dense_prefill_flops += 4 * cfg.head_dim * cfg.num_heads * cfg.num_layers * len(s) * (len(s) + 1) // 2
        # a sequence the prefix cache served (engine/prefix_sharing.py) runs only what follows, over it
        hits = [s for s in seqs if s.prefix_cached]
        fresh = [s for s in seqs if not s.prefix_cached]
        rows = iter(self._fresh_prefill(fresh) if fresh else [])
        served = iter(self._rest(hits, [s.prefix_cached for s in hits]) if hits else [])
        hidden = torch.stack([next(served) if s.prefix_cached else next(rows) for s in seqs])
        for s in seqs:
            s.num_cached = len(s)
            if self.sharing is not None:  # its prompt's blocks (or compressed part) go in the prefix cache
                self.sharing.register(s)
        return self._sample(seqs, hidden)

    def release(self, seq_id: int):
        """Forget a sequence that left the engine (finished or aborted)."""
        self.read_states.pop(seq_id, None)

    def _fresh_prefill(self, seqs) -> torch.Tensor:
        """Every token of these sequences, by the method's way of prefilling -> each one's last hidden
        state [len(seqs), hidden]."""
        method = self.method if self.method is not None and self.method.compresses else None
        if method is not None and method.refill_layer is not None:  # GemFilter: a filter pass, then its picks
            return self._refilled_prefill(seqs)
        if method is not None and method.blends:  # CacheBlend: chunks alone, then a blend
            return torch.stack([self._blended_prefill(s) for s in seqs])
        if method is not None and method.merges_chunks:  # HOMER: chunks apart, merged up the layers
            return torch.stack([self._merging_prefill(s) for s in seqs])
        # a chunked method (base.py: prefill_chunk) prefills each long prompt a chunk at a time, alone
        chunk = method.prefill_chunk if method is not None else None
        chunked = [chunk is not None and s.compress_len > chunk for s in seqs]
        plain = [s for s, c in zip(seqs, chunked) if not c]
        rows = iter(self._prefill(plain, method) if plain else [])
        return torch.stack([self._chunked_prefill(s, chunk) if c else next(rows) for s, c in zip(seqs, chunked)])

    def _prefill(self, seqs, method):
        """Every token of these sequences in one forward pass -> the hidden state of each one's last
        prompt token [len(seqs), hidden] (or of its last token, when a second pass runs what
        follows the compressed part)."""
        # A method that re-trims earlier layers, or scores with a pass of its own, finishes the
        # compressed part first; what follows it then runs over the cache as it ends (base.py).
        split = [method is not None and (method.trims_earlier_layers or bool(s.scoring_passes)) for s in seqs]
        query_lens, ids, positions = [], [], []
        for s, later in zip(seqs, split):
            n = s.compress_len
            head = s.all_token_ids[:n] if later else s.all_token_ids
            ids += head + sum(s.scoring_passes, [])
            # each scoring pass sits right after the prompt, as if it were the only one
            positions += [torch.arange(len(head), device=self.device)] + [torch.arange(n, n + len(p), device=self.device)
                                                                       for p in s.scoring_passes]
            query_lens.append(len(head) + sum(len(p) for p in s.scoring_passes))
        hidden, attention = self._forward(seqs, query_lens, ids, torch.cat(positions), finish=False)
        attention.finish()
        # the prompt's last token, before any pass: from the split the step ends with (a narrowing
        # method drops prompt rows between layers)
        hidden = hidden[last_rows(attention.query_lens, [sum(len(p) for p in s.scoring_passes) for s in seqs])]
        rest = [i for i, (s, later) in enumerate(zip(seqs, split)) if later and len(s) > s.compress_len]
        if rest:
            hidden[rest] = self._rest([seqs[i] for i in rest])
        return hidden

    def _refilled_prefill(self, seqs) -> torch.Tensor:
        """A filter pass (GemFilter: base.py refill_layer): each compressed part runs up to the
        method's layer, which picks tokens; their KV is dropped and the picked tokens, then what
        follows the compressed part, are prefilled alone at positions 0, 1, ... (its
        position_shift: how far decode positions fall behind) -> each one's last hidden state."""
        heads = [s.all_token_ids[:s.compress_len] for s in seqs]
        _, attention = self._forward(seqs, [len(h) for h in heads], sum(heads, []),
                                     torch.cat([torch.arange(len(h), device=self.device) for h in heads]), finish=False)
        attention.finish()
        tokens = []
        for i, (s, head) in enumerate(zip(seqs, heads)):
            self.cache.free(s.id)  # the filter pass's KV goes; the second pass starts afresh
            self.cache.add(s.id)
            picked = [t for t, kept in zip(head, attention.refilled[i].tolist()) if kept]
            s.position_shift = len(head) - len(picked)
            tokens.append(picked + s.all_token_ids[s.compress_len:])
        positions = torch.cat([torch.arange(len(t), device=self.device) for t in tokens])
        hidden = self._forward(seqs, [len(t) for t in tokens], sum(tokens, []), positions, compress=False)
        return hidden[last_rows([len(t) for t in tokens])]

    def _chunked_prefill(self, s: Sequence, chunk: int) -> torch.Tensor:
        """One sequence's compressed part `chunk` tokens a forward pass (each followed by the method's
        scoring passes, at the positions after it), the method compressing what the layer holds
        after each; then what follows it in a second pass -> the last token's hidden state."""
        n, ids = s.compress_len, s.all_token_ids
        for start in range(0, n, chunk):
            part = ids[start:min(n, start + chunk)]
            end = start + len(part)
            positions = [torch.arange(start, end, device=self.device)] + \
                [torch.arange(end, end + len(p), device=self.device) for p in s.scoring_passes]
            hidden = self._forward([s], [len(part) + sum(len(p) for p in s.scoring_passes)], part + sum(s.scoring_passes, []),
                                   torch.cat(positions), compress_lens=[len(part)], chunked=True)[len(part) - 1]
        return self._rest([s])[0] if len(s) > n else hidden

    def _blended_prefill(self, s: Sequence) -> torch.Tensor:
        """A blending method's prefill of one sequence (engine/blending.py): its compressed part with
        each of the method's chunks attending over itself alone, then again over that cache,
        recomputing the tokens the method picks; then what follows in a second pass -> the last
        token's hidden state."""
        n, ids = s.compress_len, torch.tensor(s.all_token_ids[:s.compress_len], device=self.device)
        positions = torch.arange(n, device=self.device)
        chunks = self.method.chunk_lengths(s.all_token_ids[:n])
        alone = ChunksAlone(self.cache, s.id, chunks, positions)
        self.model(ids, positions, alone)  # its hidden states are not needed
        self.last_blend = Blend(self.cache, s.id, n, self.method)
        hidden = self.model(ids, positions, self.last_blend)[-1]
        self.prefill_flops += alone.prefill_flops + self.last_blend.prefill_flops
        return self._rest([s])[0] if len(s) > n else hidden

    def _merging_prefill(self, s: Sequence) -> torch.Tensor:
        """A merging method's prefill of one sequence (engine/merging_prefill.py): its compressed part
        as chunks, processed apart, pruned and merged pairwise up the layers; then what follows in a
        second pass, after the suffix's positions (its position_shift) -> the last token's hidden state."""
        n = s.compress_len
        tree = self.method.tree(n, self.model.cfg.num_layers)
        merge = MergingPrefill(self.cache, s.id, tree, self.method, s.all_token_ids[:n], self.ranks)
        hidden = self.model(merge.ids, merge.positions, merge)[-1]
        self.prefill_flops += merge.prefill_flops
        self.last_merge = merge
        s.position_shift = n - merge.next_position
        return self._rest([s])[0] if len(s) > n else hidden

    def _rest(self, seqs, starts: list[int] | None = None) -> torch.Tensor:
        """What follows each one's compressed part (a question, a recompute's generated tokens), or its
        first `starts` tokens (a cached prefix), over the cache it holds -> each one's last hidden
        state [len(seqs), hidden]."""
        starts = starts or [s.compress_len for s in seqs]
        tails = [s.all_token_ids[start:] for s, start in zip(seqs, starts)]
        # (a merging method's compressed part ends before its length: position_shift)
        positions = torch.cat([torch.arange(start, len(s), device=self.device) - s.position_shift
                               for s, start in zip(seqs, starts)])
        hidden = self._forward(seqs, [len(t) for t in tails], sum(tails, []), positions, compress=False)
        return hidden[last_rows([len(t) for t in tails])]

    def _forward(self, seqs, query_lens, ids, positions, compress=True, finish=True, compress_lens=None,
                 chunked=False):
        """The model over the cache for these sequences' new tokens -> hidden states [T, hidden]
        (with finish=False also the step's StepAttention, for the caller to finish).
        ids: a list (prefill), or with positions host tensors (decode)."""
        if isinstance(ids, list):
            ids = torch.tensor(ids, device=self.device)
        attention = StepAttention(self.cache, [s.id for s in seqs], query_lens, positions, self.method,
                                   compress_lens or [s.compress_len for s in seqs], ids,
                                   [[len(p) for p in s.scoring_passes] for s in seqs] if compress else None, compress,
                                   self.send, self.read_states, getattr(self.model, "inv_freq", None),
                                   lambda i: seqs[i].all_token_ids, chunked, self.ranks, self.graphs is not None)
        # the graphs replay the engine's own method's decode (one that decodes alike shares them)
        if (attention.is_decode and self.graphs is not None and self.graphs.takes(attention)
                and RequestMethods.same_decode(self.method, self.default_method)):
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
        self.prefill_flops += int(attention.prefill_flops)  # a prefill's: read once a forward pass
        if not finish:
            return hidden, attention
        attention.finish()
        return hidden

    def _sample(self, seqs, hidden):
        """Each sequence's next token, from its row of `hidden` [len(seqs), hidden]."""
        logits = self.model.compute_logits(hidden)
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        if self.ranks is not None:  # rank 0's draw on every rank: one sequence of tokens, however sampled
            tokens = self.ranks.broadcast(tokens.contiguous())
        return tokens.tolist()


def last_rows(lengths: list[int], after: list[int] | None = None) -> list[int]:
    """The row of each sequence's last token in a step of `lengths` rows each, less `after` rows that
    follow it (a method's scoring passes)."""
    return [end - 1 - (after[i] if after else 0) for i, end in enumerate(accumulate(lengths))]
