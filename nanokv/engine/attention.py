"""StepAttention: the `attention` callable the model calls, for one forward step over the KV
cache (see nanokv/models/llama.py for the contract), and where a compression method acts.

A step is either a prefill (one or more sequences, each with a chunk of new tokens) or a
decode (every sequence with exactly one new token). Decode reserves the new tokens' slots in
every layer before layer 0 and attends in a few batched calls over groups of sequences of
similar length (`cache.decode_groups`). Prefill runs one sequence at a time (each one is a large
matmul already) and reserves each layer's slots when that layer runs, so a prompt that a method
compresses holds its earlier layers compressed and only the current one whole.

Each layer runs write -> attend -> (score -> keep / merge -> compact). The writes and reads are
the cache's (`write_decode`, `attend_decode`, `write_prefill`, `attend_prefill`): each block kind
(full precision, quantized, slim keys, latents, merged pairs, shared layers) reads its own way,
through the kernels, and this file never looks at the pool. The scoring is the method's
(nanokv/methods/base.py): at the end of a prefill it picks, layer by layer, what the prompt keeps
(`_compress`); a decode-time method (H2O, TOVA) also scores the slots with each decode step's
attention and evicts what each head holds over budget (`_evict`: one a step, several when a
method's budget drops); a merging method (CaM, D2O, KVMerger) first folds what goes into the K/V
of slots that stay; MiniCache merges a pair of layers after the second one's prompt has attended
(`_paired_prefill`); ThinK thins the older keys (`cache.prune`); a query-aware method (Quest)
evicts nothing: each decode step it picks the blocks each head reads (`_selected_pages`) and the
kernel gets a block table of those alone.
"""

from __future__ import annotations

import torch

from nanokv.cache.codec import IMPORTANCE
from nanokv.cache.pool import HOST
from nanokv.engine.upload import HostToDevice
from nanokv.kernels.reference import quest_pages, tile_pairs
from nanokv.methods.base import DecodeStep, OffloadView, PrefillView, ReadStep, SparsePrefillView


class StepAttention:
    def __init__(self, cache, seq_ids: list[int], query_lens: list[int], positions: torch.Tensor, method=None,
                 compress_lens: list[int] | None = None, token_ids: torch.Tensor | None = None,
                 scoring_passes: list[list[int]] | None = None, compress: bool = True,
                 send: HostToDevice | None = None, read_states: dict | None = None,
                 inv_freq: torch.Tensor | None = None, histories=None, chunked: bool = False, ranks=None,
                 graphed: bool = False):
        """A decode's positions and token ids may come on the host: they go to the device with the
        step's tables, in one copy by `send` (engine/upload.py), and the model reads them back
        from here (`positions`, `ids`). `read_states`: a query-aware reader's state per sequence
        id, kept by the runner from step to step; `inv_freq`: the model's RoPE speeds (ReadStep);
        `graphed`: a CUDA graph may replay this decode step (engine/cuda_graphs.py)."""
        self.cache, self.seq_ids, self.query_lens = cache, seq_ids, query_lens
        compressing = method if method is not None and method.compresses else None
        # a method that picks the tokens each layer's prompt keeps (the PrefillSelector role)
        self.method = compressing if compressing is not None and compressing.selects_tokens else None
        # a method that stores pairs of layers once (MiniCache: the cache holds the pairs it asked for)
        self.pair_merger = compressing if compress else None
        # the second pass over a finished compressed prompt (runner.py) compresses nothing; a
        # decode-time method replays its evictions over it, token by token (_generated)
        self.compress = compress
        if not compress and not (self.method is not None and self.method.evicts_during_decode):
            self.method = None
        # a codec that stores each token by its importance (ZipCache, MiKV): it ranks every prompt
        self.ranker = cache.codec if compress and cache.codec is not None and cache.codec.ranks_tokens else None
        # a method that picks which blocks each decode step reads (Quest)
        self.selector = method if method is not None and method.selects_pages else None
        # a reader whose older tokens live in host memory (methods/base.py: Offloader)
        self.offloader = method if method is not None and method.offloads else None
        # a method that computes a fresh prompt's attention in some tiles only (methods/base.py: SparsePrefill)
        self.sparse = method if method is not None and method.sparse_prefill else None
        self.bytes_moved = 0  # bytes recalled from the host tier this step (a 0-d tensor once any is)
        # the prompt attention's FLOPs this step (a prefill's: _prefill_attention, _sparse_prefill)
        self.prefill_flops = 0
        self.read_states = {} if read_states is None else read_states
        self.inv_freq = inv_freq
        self.ranks = ranks  # tensor parallelism's (nanokv/distributed.py), for PrefillView.all_heads; None: one
        self.histories = histories  # i -> every token id sequence i holds (an Offloader's OffloadView.token_ids)
        # a chunk of a chunked prefill (Method.prefill_chunk): its new tokens follow what the earlier
        # chunks left, and the method compresses both together
        self.chunked = chunked
        # KV bytes the decode attention read this step, over all layers: a 0-d tensor on the pool's
        # device once a layer adds to it (the runner reads it once a step, not once a layer)
        self.bytes_read = 0
        # how many leading new tokens of each sequence the method compresses (its prompt, or the
        # context before a question); the rest attends over them compressed and is kept
        self.compress_lens = compress_lens or query_lens
        # the token counts of a method's own scoring passes, which follow them (methods/base.py)
        self.scoring_passes = scoring_passes or [[] for _ in seq_ids]
        # the new tokens' ids [T], for a method that reads them (PrefillView.token_ids)
        self.ids, self.positions = token_ids, positions                   # [T] all new tokens
        self.is_decode = all(n == 1 for n in query_lens)
        cache.expect_positions(int(positions.max()))  # a decode's are on the host: no wait
        self.evicting = self.method is not None and self.method.evicts_during_decode
        # a merging method's per-slot logit bias (base.py: attention_bias), passed to every read of
        # the cache (a second pass's too); none: the reads take exactly their plain path
        bias = compressing.attention_bias if compressing is not None else None
        self.biased = {} if bias is None else {"bias": bias}
        if self.evicting:
            # the slots each (layer, sequence, head) evicted this decode step: on the device until the
            # step ends (finish), so that no layer waits for the GPU to count them
            self.evicted = torch.zeros(cache.num_layers, len(seq_ids), cache.num_kv_heads, dtype=torch.long,
                                       device=cache.pool.device)
            self.rounds = None  # per group and layer: how many slots the head most over budget evicts
            cache.reserve_scratch()  # where the moves and writes of heads that evict nothing go
        if not self.is_decode:
            if self.evicting:
                self.budgets, self.prompt_lens = self._budgets(cache.pool.device)
            self.propagating: dict[int, torch.Tensor] = {}  # sequence -> [n] bool, for narrow()
            self.refilled: dict[int, torch.Tensor] = {}     # sequence -> [n] bool, a filter pass's picks
            self._split_by_sequence()
            self.sequence_state = {seq_id: {} for seq_id in seq_ids}  # PrefillView.sequence_state
            return
        # A kernel that reads each head only to its length (the C++ decode) takes the whole batch
        # at once, Quest's reduced tables too (each head's picks, -1 after).
        self.whole_batch = cache.kernels.ragged_decode and cache.ragged and not self.evicting
        # an evictor whose rounds the host counts also goes in one group under CUDA graphs (a graph
        # holds one), padded to its longest sequence rather than split by length
        self.graph_evicting = graphed and self.evicting and not self.method.budgets_from_state
        # the new tokens' slots: worked out on the device from the batch's tables where they are
        # there (the host only allocates), else on the host for each sequence
        on_device = self.whole_batch and cache.slots_on_device
        if on_device:
            cache.append_decode(seq_ids)
            slots = []
        else:
            slots = [torch.cat([cache.append_slots(s, 1) for s in seq_ids], dim=-1)]           # [L, H, b]
        groups = cache.decode_groups(seq_ids, self.whole_batch or self.graph_evicting)         # on the host
        edits = cache.table_edits()  # what changed in the tables' device mirror since the last step
        budgets = self._budgets(HOST) if self.evicting else ()
        if self.evicting and not self.method.budgets_from_state:
            # a head over budget by n evicts n: the host knows both (every held slot is visible to a
            # decode's query), so the rounds of eviction need no count from the device
            self.rounds = [(group.host[2] - budgets[0][group.host[0]][None, :, None]).clamp(min=0).amax(dim=(1, 2))
                           .tolist() for group in groups]
        # everything the step needs from the host, in one copy
        inputs = [self.positions, *slots, *edits, *[t for group in groups for t in group.host]]
        inputs += [self.ids] if self.ids is not None else []
        inputs += list(budgets)
        sent = iter((send or HostToDevice(cache.pool.device))(inputs))
        self.positions = next(sent)
        self.slots = None if on_device else next(sent)
        cache.apply_table_edits([next(sent) for _ in edits])
        self.groups = [cache.device_group(group, [next(sent) for _ in group.host]) for group in groups]
        if self.selector is not None and not self.selector.picks_by_bounds:
            # a reader that picks for itself: each group's sequence ids, and its state for this step's layers
            members = [group.host[0].tolist() for group in groups]
            self.group_seqs = [[seq_ids[i] for i in rows] for rows in members]
            self.group_compress_lens = [[self.compress_lens[i] for i in rows] for rows in members]
            self.step_states = [{} for _ in groups]
        if on_device:
            self.slots = cache.decode_slots(*self.groups[0][1:])
        self.ids = next(sent) if self.ids is not None else None
        if self.evicting:
            self.budgets, self.prompt_lens = next(sent), next(sent)
        self._split_by_sequence()

    def bind(self, ids, positions, slots, members, tables, lengths, budgets=None, prompt_lens=None, evicted=None):
        """Read a whole-batch decode's inputs from these tensors from now on (a CUDA graph's static
        buffers, engine/cuda_graphs.py): ids, positions and members (0 .. B - 1) [B], slots [L, H, B],
        tables [L, B, H, nb], lengths [L, B, H]; an evictor's budgets and prompt lengths [B], and
        where it counts what each head evicted [L, B, H]."""
        self.ids, self.positions, self.slots = ids, positions, slots
        self.groups = [[members, tables, lengths]]
        if self.evicting:
            self.budgets, self.prompt_lens, self.evicted = budgets, prompt_lens, evicted
        self.bytes_read = 0

    def _budgets(self, device):
        """A decode-time method's budget and prompt length of each sequence."""
        return (torch.tensor([self.method.decode_budget(n) for n in self.compress_lens], device=device),
                torch.tensor(self.compress_lens, device=device))

    def _split_by_sequence(self):
        self.q_pos = self.positions.split(self.query_lens)
        self.token_ids = None if self.ids is None else self.ids.split(self.query_lens)

    def __call__(self, layer, q, k, v, sliding_window):
        if self.is_decode:
            return self._decode(layer, q, k, v, sliding_window)
        cache, outs = self.cache, []
        source = cache.sources[layer]  # a layer sharing another's KV reads that (KVSharer)
        new = zip(self.seq_ids, q.split(self.query_lens), k.split(self.query_lens), v.split(self.query_lens), self.q_pos)
        for i, (seq_id, q_i, k_i, v_i, pos_i) in enumerate(new):
            if source != layer:  # it keeps no KV of its own: its queries read the source layer's
                outs.append(self._prefill_attention(seq_id, source, q_i, pos_i, sliding_window)[0])
                continue
            if cache.pair_of(layer) is not None:  # the second layer of a merged pair (MiniCache)
                outs.append(self._paired_prefill(layer, i, q_i, k_i, v_i, pos_i, sliding_window))
                continue
            m = sum(self.scoring_passes[i])  # a scoring pass is written when it runs, and dropped
            cached = len(q_i) - m
            cache.write_prefill(seq_id, layer, k_i[:cached], v_i[:cached], pos_i[:cached])
            if self.method is None or not self.compress:
                outs.append(self._generated(layer, i, q_i, pos_i, sliding_window) if self.method is not None
                            else self._sparse_prefill(layer, i, q_i, k_i, v_i, pos_i, sliding_window)
                            if self.sparse is not None
                            else self._prefill_attention(seq_id, layer, q_i, pos_i, sliding_window,
                                                      new_kv=(k_i, v_i), **self.biased)[0])
                if self.method is None and self.ranker is not None:  # a quantizer alone ranks its prompt
                    n = self.compress_lens[i]
                    self._rank(self._view(layer, seq_id, q_i[:n], None, True), seq_id)
                cache.settle(seq_id, layers=slice(layer, layer + 1))
                if self.offloader is not None:
                    self._offload(layer, seq_id, prefill=True, queries=q_i)
                continue
            # The prompt attends over itself, then is compressed. Tokens generated before a
            # preemption (recompute) then attend over the compressed prompt, as they did the
            # first time, so the recomputed cache is the one the sequence had.
            n = self.compress_lens[i]
            out, column_sums = self._prefill_attention(seq_id, layer, q_i[:n], pos_i[:n], sliding_window,
                                                    self.method.needs_column_sums, new_kv=(k_i[:n], v_i[:n]),
                                                    **self.biased)
            outs.append(out)
            scoring = None
            if m:  # nothing follows a scoring pass in this forward (the runner's second pass)
                out, scoring = self._scoring_passes(layer, i, q_i[n:], k_i[n:], v_i[n:], pos_i[n:], sliding_window)
                outs.append(out)
            self._compress(layer, seq_id, q_i[:n], column_sums, i, scoring)
            if n + m < len(q_i):
                outs.append(self._generated(layer, i, q_i[n + m:], pos_i[n + m:], sliding_window))
            cache.settle(seq_id, layers=slice(layer, layer + 1))
        return torch.cat(outs)

    def _sparse_prefill(self, layer, i, q, k, v, q_pos, sliding_window):
        """Sequence i's new tokens at `layer` under a SparsePrefill method: a prompt the sequence holds
        alone (no cached prefix, no window) attends over itself in the tiles the method keeps; a
        recompute's generated tokens after it, and any other chunk, attend densely over the cache.
        Counts the FLOPs of the tiles computed (prefill_flops)."""
        seq_id, cache, method = self.seq_ids[i], self.cache, self.sparse
        n, D = self.compress_lens[i], q.shape[-1]
        fresh = sliding_window is None and n <= len(q) and cache.holds_only(seq_id, layer, len(q))
        mask = None if not fresh else method.tile_mask(SparsePrefillView(
            layer, cache.num_layers, q[:n], k[:n], q_pos[:n], self.sequence_state[seq_id]))
        if mask is None:  # dense: over any cached prefix and itself
            return self._prefill_attention(seq_id, layer, q, q_pos, sliding_window, new_kv=(k, v))[0]
        tile = method.tile_size
        out = cache.kernels.sparse_prefill(q[:n], k[:n], v[:n], mask, tile)
        self.prefill_flops += 4 * D * (mask.long() * tile_pairs(n, tile, mask.device)).sum()
        if n == len(q):
            return out
        rest = self._prefill_attention(seq_id, layer, q[n:], q_pos[n:], sliding_window)[0]
        return torch.cat([out, rest])

    def _prefill_attention(self, seq_id, layer, q, q_pos, sliding_window, *args, **options):
        """cache.attend_prefill, counting its FLOPs: 4 D per (query, key) pair per query head (QK^T and
        PV), each of the T queries over what the layer holds less the later queries' own slots."""
        cache = self.cache
        source = cache.sources[layer]
        held = int(cache.seqs[seq_id].lengths[source].max()) // max(1, cache.slot_counts[source])
        T = len(q)
        self.prefill_flops += 4 * q.shape[-1] * q.shape[1] * max(0, T * held - T * (T - 1) // 2)
        return cache.attend_prefill(seq_id, layer, q, q_pos, sliding_window, *args, **options)

    def _decode(self, layer, q, k, v, sliding_window):
        cache = self.cache
        cache.write_decode(layer, self.slots[layer], k, v, self.positions)
        selecting = self.selector is not None and layer >= self.selector.skip_layers
        if self.whole_batch and not selecting:  # one call in batch order: nothing to pick out or put back
            out, nbytes = cache.attend_decode(layer, q, self.positions, self.groups[0][1:], sliding_window,
                                              **self.biased)
            self.bytes_read += nbytes
            return out
        if not (selecting or self.evicting):  # the block kind reads its own way
            out = torch.empty_like(q)
            for members, *group in self.groups:
                out[members], nbytes = cache.attend_decode(layer, q[members], self.positions[members], group,
                                                           sliding_window, **self.biased)
                self.bytes_read += nbytes
            return out
        # full-precision blocks read through tables a method changes (Quest) or whose attention
        # it scores (H2O): the registry gives these methods no other block kind
        source, out = cache.sources[layer], torch.empty_like(q)
        for g, (members, tables, lengths) in enumerate(self.groups):
            tables, lengths = tables[source], lengths[source]
            if self.offloader is not None and selecting:
                out[members] = self._recall_picks(layer, g, members, q[members], tables, lengths, sliding_window)
                continue
            if selecting and not self.selector.picks_by_bounds:
                out[members] = self._read_picks(layer, g, members, q[members], tables, lengths, sliding_window)
                continue
            if selecting:
                tables, lengths = self._selected_pages(q[members], tables, lengths)
            self.bytes_read += cache.read_bytes(lengths)
            result = cache.attend_tables(q[members], self.positions[members], tables, lengths, sliding_window,
                                         self.evicting, **self.biased)
            if self.evicting:
                result, probs = result
                evicted = self._evict(layer, tables, lengths, q[members], probs, self.positions[members],
                                      self.budgets[members], self.prompt_lens[members],
                                      self.rounds[g][source] if self.rounds is not None else None,
                                      self.ids[members] if self.ids is not None else None)
                self.evicted[layer, members] = evicted
            out[members] = result
        return out

    def _paired_prefill(self, layer, i, q, k, v, q_pos, sliding_window):
        """The second layer b of a merged pair (MiniCache, nanokv/cache/paired.py): with the method,
        the prompt first attends over b's own K/V whole, then the method merges the pair's prompt;
        what follows the prompt attends over a's merged slots and b's own."""
        cache, seq_id = self.cache, self.seq_ids[i]
        cache.write_prefill(seq_id, layer, k, v, q_pos)
        n, outs = self.compress_lens[i] if self.pair_merger is not None else 0, []
        if n:  # prefill starts from an empty cache
            outs.append(self._prefill_attention(seq_id, layer, q[:n], q_pos[:n], sliding_window, merged=False)[0])
            cache.store_merged(seq_id, layer, n, self.pair_merger.merge_pair(*cache.pair_prompt(seq_id, layer, n)))
        if n < len(q):
            outs.append(self._prefill_attention(seq_id, layer, q[n:], q_pos[n:], sliding_window)[0])
        return torch.cat(outs)

    def _selected_pages(self, q, tables, lengths):
        """Quest: score every held page of each head against the query (kernels.page_scores over
        the cache's key bounds) and pick the method's number of pages (kernels.reference.quest_pages)
        -> the reduced tables [b, H, k] (the picked blocks in their order, -1 after) and lengths.
        Everything stays on the device: k is the method's, not counted from the picks."""
        cache, kernels = self.cache, self.cache.kernels
        bs, (kmin, kmax) = cache.block_size, cache.key_bounds()
        self.bytes_read += tables.ge(0).sum() * (2 * kmin.shape[-1] * kmin.dtype.itemsize)  # the bounds
        pages = self.selector.pages_to_read(bs)
        if kernels.quest_select is not None:
            # the same pick in one C++ call: the torch steps cost several times the attention
            # over the pages they keep on a CPU (cpu_quest.cpp)
            return kernels.quest_select(q, kmin, kmax, tables, lengths, bs, pages)
        return quest_pages(kernels.page_scores(q, kmin, kmax, tables), tables, lengths, bs, pages)

    def _read_picks(self, layer, g, members, q, tables, lengths, sliding_window):
        """A reader that picks for itself (methods/base.py: PageReader.pick): show it the query and
        what it reads, then attend over the pages or the single slots it picked."""
        cache, reader = self.cache, self.selector
        def fetch(name):
            if name == "bounds":
                return {"bounds": cache.table_bounds(tables)}
            held = cache.read_tables(tables, ("k", "pos"))
            return {"keys": held["k"], "key_positions": held["pos"]}

        picks = reader.pick(self._read_step(layer, g, members, q, lengths, tables.shape[-1], fetch))
        self.bytes_read += picks.scored_bytes
        if picks.slots is not None:
            out, nbytes = cache.attend_slots(q, self.positions[members], tables, picks.slots, sliding_window)
            self.bytes_read += nbytes
            return out
        tables, lengths = cache.pick_pages(tables, lengths, picks.pages)
        self.bytes_read += cache.read_bytes(lengths)
        return cache.attend_tables(q, self.positions[members], tables, lengths, sliding_window)

    def _read_step(self, layer, g, members, q, lengths, pages: int, fetch) -> ReadStep:
        """Group g's ReadStep at `layer` over heads holding `lengths` tokens in `pages` pages, read
        through `fetch`: the sequences' states from step to step, and the step's own."""
        cache = self.cache
        return ReadStep(layer, cache.num_layers, q, self.positions[members], lengths, cache.block_size,
                        cache.pool.dtype.itemsize, [self.read_states.setdefault(i, {}) for i in self.group_seqs[g]],
                        self.step_states[g], inv_freq=self.inv_freq, fetch=fetch, pages=pages,
                        compress_lens=self.group_compress_lens[g], ranks=self.ranks)

    def _recall_picks(self, layer, g, members, q, tables, lengths, sliding_window):
        """An Offloader (methods/base.py): it picks host slots or pages from what the device keeps of
        them; the engine recalls those and attends over them and the device window in one softmax."""
        cache, reader, seqs = self.cache, self.offloader, self.group_seqs[g]
        host_tables, host_lengths = cache.host_held(seqs, layer)
        # the group's tables are as wide as its widest layer's, a skip layer's whole prompt: read
        # only this layer's device part (ClusterKV at 4k prompts read 4,016 slots a head for 32)
        tables = tables[..., :cache.device_width(seqs, layer)]
        device = q.device

        def fetch(name):
            if name == "bounds":
                return {"bounds": cache.read_summary_bounds(host_tables)}
            if name in ("keys", "key_positions"):
                held = cache.read_host(host_tables, ("k", "pos"))
                return {"keys": held["k"], "key_positions": held["pos"]}
            return cache.read_summaries(host_tables, (name,))

        step = self._read_step(layer, g, members, q, host_lengths.to(device), host_tables.shape[-1], fetch)
        picks = reader.pick(step)
        slots = picks.slots
        if slots is None:  # pages -> their slots, past each head's length dropped
            bs = cache.block_size
            slots = (picks.pages[..., None] * bs + torch.arange(bs, device=picks.pages.device)).flatten(-2)
            slots = slots.masked_fill((picks.pages < 0).repeat_interleave(bs, dim=-1) |
                                      (slots >= step.lengths.to(slots.device)[..., None]), -1)
        slots = slots.to(device)
        picked = slots >= 0
        names = ("v", "pos") if picks.keys is not None else ("k", "v", "pos")
        recalled = cache.recall(host_tables, slots, names)
        if picks.keys is not None:
            recalled["k"] = picks.keys
        out, nbytes = cache.attend_recalled(q, self.positions[members], tables, lengths, recalled, picked,
                                            sliding_window, picks.log_weights)
        self.bytes_read += nbytes + picks.scored_bytes
        self.bytes_moved += cache.recalled_bytes(picked, names)
        return out

    def _offload(self, layer, seq_id, prefill: bool, queries=None):
        """Move what the host tier is due of `layer` (cache.due_offload) there, with the summaries the
        Offloader keeps of it on the device (`queries`: a prefill's, whose first tokens move)."""
        n = self.cache.due_offload(seq_id, layer, prefill)
        if n:
            held = self.cache.read_prompt(seq_id, layer, n, ("k", "v", "pos"))  # the oldest n on the device
            ids = None
            if self.offloader.needs_vocabulary and self.histories is not None:
                history = self.histories(self.seq_ids.index(seq_id))
                ids = torch.tensor([history[p] for p in held["pos"].tolist()], device=held["pos"].device)
            view = OffloadView(layer, held["k"], held["v"], held["pos"], self.read_states.setdefault(seq_id, {}),
                               self.inv_freq, ids, None if queries is None else queries[:n])
            self.cache.offload(seq_id, layer, n, self.offloader.summarize(view))
            self.cache.state_bytes[seq_id] = self.offloader.state_bytes(view.state)  # its index, on the device

    def narrow(self, layer: int) -> torch.Tensor | None:
        """The model asks after each layer (models/llama.py): the rows of this step's tokens that go on
        to the next one. A prefill drops the prompt tokens a narrowing method did not propagate (FastKV,
        LazyLLM: their KV stops at this layer; each sequence's last prompt token always goes on), and
        a filter pass ends at the method's refill_layer (GemFilter). None: every row goes on."""
        if self.is_decode or not (self.propagating or self.refilled):
            return None
        if self.refilled:
            return torch.zeros(0, dtype=torch.long, device=self.positions.device)
        keep, lens = [], []
        for i, length in enumerate(self.query_lens):
            rows = torch.ones(length, dtype=torch.bool, device=self.positions.device)
            n = self.compress_lens[i]
            if i in self.propagating:
                rows[:n] = self.propagating[i].to(rows.device)
                rows[n - 1] = True  # the prompt's last token: the runner samples from it
            keep.append(rows)
            lens.append(rows.sum())
        counts = torch.stack(lens).tolist()  # one read per narrowing layer: the new split
        self.compress_lens = [n - (length - c) for n, length, c in zip(self.compress_lens, self.query_lens, counts)]
        self.query_lens, self.propagating = counts, {}
        rows = torch.cat(keep).nonzero().flatten()
        self.positions = self.positions[rows]
        self.ids = None if self.ids is None else self.ids[rows]
        self._split_by_sequence()
        return rows

    def finish(self):
        """After the forward pass (a decode: after its sampled tokens are read, so the counts below
        come back without a wait): shorten each head by the slots it evicted during this decode step;
        let the cache settle what it changes once tokens are cached (quantize full residuals)."""
        if self.is_decode:
            if self.evicting:
                evicted = self.evicted.to(HOST)
                for i in evicted.any(dim=2).any(dim=0).nonzero().flatten().tolist():
                    self.cache.drop_last(self.seq_ids[i], evicted[:, i])
            for seq_id in self.seq_ids:
                self.cache.settle(seq_id)
                if self.offloader is not None:  # a decode that filled a block past the window moves it
                    for layer in range(self.offloader.skip_layers, self.cache.num_layers):
                        self._offload(layer, seq_id, prefill=False)

    def _generated(self, layer, i, q, q_pos, sliding_window):
        """A recompute's generated tokens over the compressed prompt. A decode-time method evicted
        as each of them was decoded: replay that one token at a time, so the cache ends as it was."""
        seq_id, cache = self.seq_ids[i], self.cache
        if not self.evicting:
            return self._prefill_attention(seq_id, layer, q, q_pos, sliding_window, **self.biased)[0]
        outs, ids = [], self.token_ids[i][-len(q):] if self.token_ids is not None else [None] * len(q)
        for q_t, pos_t, id_t in zip(q, q_pos, ids):
            tables, lengths = cache.held(seq_id, layer)
            out, probs = cache.attend_tables(q_t[None], pos_t[None], tables, lengths, sliding_window, True,
                                             **self.biased)
            evicted = self._evict(layer, tables, lengths, q_t[None], probs, pos_t[None], self.budgets[i:i + 1],
                                  self.prompt_lens[i:i + 1], token_ids=None if id_t is None else id_t[None])
            cache.drop_last(seq_id, evicted.to(HOST), layers=slice(layer, layer + 1))
            outs.append(out)
        return torch.cat(outs)

    def _scoring_passes(self, layer, i, q, k, v, q_pos, sliding_window):
        """A method's scoring passes for sequence i at `layer`, each over the prompt and itself:
        written after the prompt, attended, then dropped before the next one.
        -> (their outputs, (queries [m, Hq, D], keys [H, m, D], tokens of each pass))."""
        seq_id, lengths, cache = self.seq_ids[i], self.scoring_passes[i], self.cache
        layers, outs, keys, start = slice(layer, layer + 1), [], [], 0
        for length in lengths:
            part = slice(start, start + length)
            held = int(cache.seqs[seq_id].lengths[layer].max())  # every head: a prefill's prompt
            cache.write_prefill(seq_id, layer, k[part], v[part], q_pos[part])
            outs.append(self._prefill_attention(seq_id, layer, q[part], q_pos[part], sliding_window)[0])
            keys.append(cache.read_prompt(seq_id, layer, held + length, ("k",))["k"][:, held:])
            cache.drop_last(seq_id, torch.full((1, cache.num_kv_heads), length, device=HOST), layers=layers)
            start += length
        return torch.cat(outs), (q, torch.cat(keys, dim=1), lengths)

    def _compress(self, layer: int, seq_id: int, queries: torch.Tensor, column_sums: torch.Tensor | None, i: int = 0,
                  scoring: tuple | None = None):
        """Let the method pick what layer `layer` of a just-prefilled sequence keeps, and set its
        per-token state; compact. Nothing else in this forward pass reads this layer's KV again.
        `scoring`: what a method's scoring passes left it (_scoring_passes)."""
        cache, method = self.cache, self.method
        n, held = len(queries), int(cache.seqs[seq_id].lengths[layer].max())
        before = held - n if self.chunked else 0  # a chunk's: what the earlier chunks left, first
        count = before + n  # the slots the method judges; a recompute's generated tokens follow them
        view = self._view(layer, seq_id, queries, column_sums, method.needs_values, count)
        view.held_before = before
        if scoring is not None:
            view.scoring_queries, view.scoring_keys, view.scoring_lengths = scoring
        if method.needs_vocabulary:
            if self.token_ids is None or held != len(self.token_ids[i]):
                raise ValueError(f"method {method.name!r} needs the token ids of a prefill from an empty cache")
            view.token_ids = self.token_ids[i][:n]  # a prefill writes its tokens from slot 0, in order
        cache.write_prompt(seq_id, layer, count, method.state_of(view))
        self._rank(view, seq_id)  # before compaction, which moves each token's importance with it
        keep = method.keep_mask(view)
        if keep is not None and method.merges:  # what goes is folded into what stays (base.py)
            cache.write_prompt(seq_id, layer, count, method.merge(view, keep))
        masks = {} if keep is None else {layer: keep}
        masks.update(method.earlier_keep_masks(view))  # a cascade re-trims earlier layers (base.py)
        for at, kept in masks.items():
            kept = kept.to(HOST)  # block tables live on the host
            generated = torch.ones(kept.shape[0], held - count, dtype=torch.bool, device=HOST)
            cache.compact(seq_id, torch.cat([kept, generated], dim=1)[None], layers=slice(at, at + 1))
        for at, fields in method.earlier_prefill_state(view).items():
            cache.write_prompt(seq_id, at, next(iter(fields.values())).shape[1], fields)
        if method.prunes_key_channels:  # the older kept tokens' keys keep the channels the method picks (ThinK)
            prompt = torch.full((view.keys.shape[0],), n, device=HOST) if keep is None else keep.sum(-1).to(HOST)
            cache.prune(seq_id, layer, method.key_channels(view, keep).to(HOST), (prompt - method.recent).clamp(min=0))
        if method.narrows:  # the prompt tokens that go on to the next layer (narrow)
            carried = method.propagate(view)
            if carried is not None:
                self.propagating[i] = carried
        if layer == method.refill_layer:  # a filter pass ends here (narrow); the runner re-prefills
            self.refilled[i] = method.refill(view)

    def _view(self, layer: int, seq_id: int, queries: torch.Tensor, column_sums: torch.Tensor | None,
              values: bool, count: int | None = None) -> PrefillView:
        """What a method (or a ranking codec) sees of the first `count` slots of `layer` (default
        len(queries): a prompt from an empty cache)."""
        n, cache = len(queries) if count is None else count, self.cache
        prompt = cache.read_prompt(seq_id, layer, n, ("k", "pos", "v") if values else ("k", "pos"))
        return PrefillView(layer, cache.num_layers, queries, prompt["k"], prompt["pos"],
                           None if column_sums is None else column_sums[:, :n], self.sequence_state[seq_id],
                           values=prompt.get("v"), ranks=self.ranks)

    def _rank(self, view: PrefillView, seq_id: int):
        """A codec that stores tokens by importance (cache/codec.py) ranks the prompt's."""
        if self.ranker is not None:
            self.cache.write_prompt(seq_id, view.layer, view.keys.shape[1],
                                    {IMPORTANCE: self.ranker.importance(view).float()})

    def _evict(self, layer, tables, lengths, q, probs, q_pos, budgets, prompt_lens, rounds=None,
               token_ids=None) -> torch.Tensor:
        """Decode-time eviction for b sequences at one layer (tables [b, H, nb], lengths [b, H]):
        the method scores every slot from the query's attention probs [b, H, group, S] and a
        DecodeStep (updating its slot fields of the slots the query sees); each head holding n
        more tokens up to `q_pos` than its budget (decode_budgets) evicts its n lowest-scoring
        outside the recent window: all at once (_drop_lowest), or for a merging method one after
        another, each first folded into the slots that stay, then the head's last slot moved into
        its place. `rounds`: the most
        any head evicts, where the caller knows it (else it is read from the device).
        -> [b, H] the number each head evicted (the caller shortens them by it)."""
        cache, method = self.cache, self.method
        S = probs.shape[-1]
        arange = torch.arange(S, device=probs.device)
        reads = {"pos", *method.slot_fields, *("k" if r == "keys" else "v" for r in method.decode_reads
                                               if r != "queries")}

        def read(length):
            """The step as the cache holds it now (a merge changes K/V; a move, the slots)."""
            fields = cache.read_slots(tables, reads)   # [b, H, S, ...] in slot order
            k_pos = fields.pop("pos")
            visible = (arange < length[..., None]) & (k_pos <= q_pos[:, None, None])  # a replay holds later tokens
            return fields, DecodeStep(layer, q_pos, prompt_lens, k_pos, visible, budgets, fields.pop("k", None),
                                      fields.pop("v", None), q if "queries" in method.decode_reads else None,
                                      token_ids if method.needs_vocabulary else None, self.ranks)

        state, step = read(lengths)
        scores, new = method.decode_scores(probs, state, step)
        cache.write_slots(tables, step.visible, new)  # a replay's later tokens keep theirs (see base.py)
        state.update(new)
        need = (step.visible.sum(-1) - method.decode_budgets(state, step)).clamp(min=0)
        rounds = int(need.max()) if rounds is None else rounds
        if rounds == 0:
            return need
        k_pos, recent = step.key_positions, method.recent_window(budgets)
        eligible = step.visible & (k_pos <= (q_pos - recent)[:, None, None])
        scores = scores.masked_fill(~eligible, float("inf"))
        flat, length = cache.slots_of(tables), lengths
        if not method.merges:  # nothing changes between victims: take them all at once
            self._drop_lowest(flat, scores, eligible, k_pos, need, lengths, rounds)
            return need
        for r in range(rounds):  # a merge changes what the next victim sees: one at a time
            evicting = need > r
            lowest = scores.min(dim=-1, keepdim=True).values
            # ties go to the oldest token, whatever slot it sits in, so a replay picks as the decode did
            victim = k_pos.masked_fill(~eligible | (scores != lowest), torch.iinfo(k_pos.dtype).max).argmin(dim=-1)
            if method.merges:  # fold the victims into the slots that stay (base.py)
                cache.write_slots(tables, step.visible & evicting[..., None],
                                  method.merge_evicted(victim, evicting, state, step))
            last = (length - 1).clamp(min=0)
            # every head moves: one that evicts nothing this round, the scratch slot onto itself
            # (picking the evicting heads out would make the host wait for their count)
            scratch = cache.reserve_scratch()
            cache.move_slots(torch.where(evicting, flat.gather(-1, last[..., None])[..., 0], scratch).flatten(),
                             torch.where(evicting, flat.gather(-1, victim[..., None])[..., 0], scratch).flatten())
            length = length - evicting.long()
            if r + 1 == rounds:
                break
            # the next round's view: the last slot now sits in the victim's (heads done evicting
            # get a garbage view, never read again)
            scores, eligible, k_pos = (x.scatter(-1, victim[..., None], x.gather(-1, last[..., None]))
                                       for x in (scores, eligible, k_pos))
            eligible = eligible & (arange < length[..., None])
            scores = scores.masked_fill(~eligible, float("inf"))
            state, step = read(length)
        return need

    def _drop_lowest(self, flat, scores, eligible, k_pos, need, length, rounds):
        """Each head [b, H] evicts its need lowest eligible scores (ties: the oldest position), the
        same set as one at a time: each victim below the head's new length takes one of the
        survivors above it, moved in one call (`rounds` >= every need, so no count is read back)."""
        S = scores.shape[-1]
        rounds = min(rounds, S)
        by_position = k_pos.masked_fill(~eligible, torch.iinfo(k_pos.dtype).max).argsort(dim=-1, stable=True)
        order = by_position.gather(-1, scores.gather(-1, by_position).argsort(dim=-1, stable=True))
        firsts = torch.arange(rounds, device=scores.device) < need[..., None]
        victim = torch.zeros_like(eligible).scatter(-1, order[..., :rounds], firsts)
        slot, kept = torch.arange(S, device=scores.device), (length - need)[..., None]
        hole = victim & (slot < kept)
        survivor = ~victim & (slot >= kept) & (slot < length[..., None])
        # the k-th hole takes the k-th survivor; heads with fewer holes move the scratch slot onto itself
        holes = torch.where(hole, slot, S + slot).argsort(dim=-1)[..., :rounds]
        survivors = torch.where(survivor, slot, S + slot).argsort(dim=-1)[..., :rounds]
        moving = torch.arange(rounds, device=scores.device) < hole.sum(-1, keepdim=True)
        scratch = self.cache.reserve_scratch()
        self.cache.move_slots(torch.where(moving, flat.gather(-1, survivors), scratch).flatten(),
                              torch.where(moving, flat.gather(-1, holes), scratch).flatten())
