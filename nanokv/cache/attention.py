"""CacheAttention: the `attention` callable the model calls, for one forward step over a
PagedKVCache (see nanokv/models/llama.py for the contract).

A step is either a prefill (one or more sequences, each with a chunk of new tokens) or a
decode (every sequence with exactly one new token). Decode reserves the new tokens' slots in
every layer before layer 0 and attends in a few batched calls over groups of sequences of
similar length. Prefill runs one sequence at a time (each one is a large matmul already) and
reserves each layer's slots when that layer runs, so a prompt that a method compresses holds
its earlier layers compressed and only the current one whole.

A compression method (nanokv/methods) acts here: at the end of a prefill it picks, layer by
layer, what the prompt keeps (`_compress`); a decode-time method (H2O, TOVA) also scores the
slots with each decode step's attention and evicts one per head over budget (`_evict`). A
merging method (CaM, D2O, KVMerger) first folds what goes into the K/V of slots that stay.
Over a quantized cache (nanokv/cache/quant_cache.py) prefill works on full precision as ever;
decode attends over the quantized blocks and the residual in one call (`quantized_decode`), and
after each layer's prefill and each decode step the cache quantizes residuals that filled up.
A layer that shares an earlier layer's KV (KVSharer, `cache.sources`) writes nothing and reads
that layer's blocks. The later layer of a merged pair (MiniCache) is attended in
nanokv/cache/paired.py. Over a latent cache (LoRC, Palu) each layer stores its new tokens'
latents and attends over K and V rebuilt from them (`_latent`); over a pruned cache (ThinK) the
older keys hold fewer channels, and attention cuts the query to them (`pruned_attention`). A
query-aware method (Quest) evicts nothing: each decode step it picks the
blocks each head reads (`_selected_pages`) and the kernel gets a block table of those alone.
"""

from __future__ import annotations

import torch

from nanokv.kernels.reference import attend, gather_blocks, pruned_attention
from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.pool import HOST
from nanokv.cache.latent_cache import LatentKVCache
from nanokv.cache.pruned_cache import PrunedKVCache
from nanokv.cache.paired import attend_second
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.methods.quest import Quest

GROUP_SLACK = 1.5  # padding waste a decode group may carry (the longest / the shortest member)


class CacheAttention:
    def __init__(self, cache: PagedKVCache, seq_ids: list[int], query_lens: list[int], positions: torch.Tensor,
                 method=None, compress_lens: list[int] | None = None, token_ids: torch.Tensor | None = None,
                 scoring_passes: list[list[int]] | None = None):
        self.cache, self.seq_ids, self.query_lens = cache, seq_ids, query_lens
        self.method = method if method is not None and method.compresses else None
        # a method that picks which blocks each decode step reads (Quest)
        self.selector = method if method is not None and method.selects_pages else None
        self.bytes_read = 0  # KV bytes the decode attention read this step, over all layers
        # how many leading new tokens of each sequence the method compresses (its prompt, or the
        # context before a question); the rest attends over them compressed and is kept
        self.compress_lens = compress_lens or query_lens
        # the token counts of a method's own scoring passes, which follow them (methods/base.py)
        self.scoring_passes = scoring_passes or [[] for _ in seq_ids]
        # the new tokens' ids [T], for a method that reads them (PrefillView.token_ids)
        self.token_ids = None if token_ids is None else token_ids.split(query_lens)
        if self.method is not None and self.method.trims_earlier_layers and isinstance(cache, QuantizedKVCache):
            raise ValueError(f"method {self.method.name!r} compacts earlier layers again, which quantized blocks cannot")
        self.positions = positions                                        # [T] all new tokens
        self.is_decode = all(n == 1 for n in query_lens)
        self.quantized = isinstance(cache, QuantizedKVCache)  # decode reads quantized blocks too
        self.latent = isinstance(cache, LatentKVCache)        # tokens stored as low-rank latents
        self.pruned = isinstance(cache, PrunedKVCache)        # older keys in fewer channels
        device = cache.pool.device
        self.evicting = self.method is not None and self.method.evicts_during_decode
        if self.evicting:
            self.budgets = torch.tensor([self.method.decode_budget(n) for n in self.compress_lens], device=device)
            self.prompt_lens = torch.tensor(self.compress_lens, device=device)
            self.evicted = torch.zeros(cache.num_layers, len(seq_ids), cache.num_kv_heads, dtype=torch.bool, device=HOST)
        self.q_pos = positions.split(query_lens)
        if not self.is_decode:
            self.sequence_state = {seq_id: {} for seq_id in seq_ids}  # PrefillView.sequence_state
            return
        self.slots = torch.cat([cache.append_slots(s, 1) for s in seq_ids], dim=-1).to(device)  # [L, H, b]
        seqs = [cache.seqs[s] for s in seq_ids]
        blocks = [int(s.num_blocks.max()) for s in seqs]
        if self.quantized:
            blocks = [b + int(s.num_qblocks.max()) for b, s in zip(blocks, seqs)]
        if self.pruned:
            blocks = [b + int(s.num_sblocks.max()) for b, s in zip(blocks, seqs)]
        # Each group is attended in one call, its tables padded to its longest member: sequences
        # of similar length, so a short one is not padded to the longest of the batch. A kernel
        # that reads each head only to its length (the C++ decode) takes the whole batch at once;
        # so does Quest's reduced tables, which are cut to the most pages any head reads.
        self.whole_batch = cache.kernels.ragged_decode and not (self.evicting or self.quantized or self.pruned
                                                                or self.latent)
        self.groups = []
        for members in [list(range(len(seqs)))] if self.whole_batch else length_groups(blocks):
            group = [torch.tensor(members, device=device)]
            for tables, lengths in self._stacked([seqs[i] for i in members]):
                group += [tables.to(device), lengths.to(device)]
            if self.pruned:  # each head's kept key channels [L, b, H, kD], after the slim part
                group.insert(3, torch.stack([seqs[i].channels for i in members], dim=1).to(device))
            self.groups.append(group)

    def _stacked(self, seqs):
        """The sequences' tables [L, b, H, nb] (padded to the longest) and lengths [L, b, H]: the
        full-precision blocks, and for a quantized cache first the quantized ones, for a pruned
        cache first the slim ones."""
        width = max(int(s.num_blocks.max()) for s in seqs)
        stacked = [(torch.stack([pad_blocks(s.tables, width) for s in seqs], dim=1),
                    torch.stack([s.lengths for s in seqs], dim=1))]
        if self.quantized:
            width = max(int(s.num_qblocks.max()) for s in seqs)
            R = self.cache.spec.block_size
            stacked.insert(0, (torch.stack([pad_blocks(s.qtables, width) for s in seqs], dim=1),
                               torch.stack([s.num_qblocks * R for s in seqs], dim=1)))
        if self.pruned:
            width = max(int(s.num_sblocks.max()) for s in seqs)
            stacked.insert(0, (torch.stack([pad_blocks(s.stables, width) for s in seqs], dim=1),
                               torch.stack([s.slim_lengths for s in seqs], dim=1)))
        return stacked

    def __call__(self, layer, q, k, v, sliding_window):
        pool, kernels = self.cache.pool, self.cache.kernels
        source = self.cache.sources[layer]  # a layer sharing another's KV reads that (KVSharer)
        if self.latent:
            return self._latent(layer, q, k, v, sliding_window)
        if layer in getattr(self.cache, "first_of", ()):  # the later layer of a merged pair (MiniCache)
            return attend_second(self, layer, q, k, v, sliding_window)
        if self.is_decode:
            if source == layer:
                self.cache.write(self.slots[layer], k, v, self.positions)
            out = torch.empty_like(q)
            if self.quantized:
                for members, qtables, qlens, tables, lengths in self.groups:
                    self.bytes_read += self.cache.read_bytes(lengths[layer], qlens[layer])
                    out[members] = kernels.quantized_decode(q[members], self.positions[members], pool.quant_blocks(),
                                                            qtables[layer], qlens[layer], pool.k, pool.v, pool.pos,
                                                            tables[layer], lengths[layer])
                return out
            if self.pruned:
                slim = pool.slim_fields
                for members, stables, slens, channels, tables, lengths in self.groups:
                    self.bytes_read += self.cache.read_bytes(lengths[layer], slens[layer])
                    out[members] = pruned_attention(q[members][:, None], self.positions[members][:, None], slim["k"],
                                                    slim["v"], slim["pos"], stables[layer], slens[layer],
                                                    channels[layer], pool.k, pool.v, pool.pos, tables[layer],
                                                    lengths[layer], sliding_window)[:, 0]
                return out
            if self.whole_batch:  # one call in batch order: nothing to pick out or put back
                [(_, tables, lengths)] = self.groups
                tables, lengths = tables[source], lengths[source]
                if self.selector is not None and layer >= self.selector.skip_layers:
                    tables, lengths = self._selected_pages(q, tables, lengths)
                self.bytes_read += self.cache.read_bytes(lengths)
                return kernels.decode(q, self.positions, pool.k, pool.v, pool.pos, tables, lengths, sliding_window)
            for members, tables, lengths in self.groups:
                tables, lengths = tables[source], lengths[source]
                if self.selector is not None and layer >= self.selector.skip_layers:
                    tables, lengths = self._selected_pages(q[members], tables, lengths)
                self.bytes_read += self.cache.read_bytes(lengths)
                result = kernels.decode(q[members], self.positions[members], pool.k, pool.v, pool.pos,
                                        tables, lengths, sliding_window, self.evicting)
                if self.evicting:
                    result, probs = result
                    evicted = self._evict(layer, tables, lengths, probs, self.positions[members],
                                          self.budgets[members], self.prompt_lens[members])
                    self.evicted[layer, members.to(HOST)] = evicted.to(HOST)
                out[members] = result
            return out
        outs = []
        new = zip(self.seq_ids, q.split(self.query_lens), k.split(self.query_lens), v.split(self.query_lens), self.q_pos)
        for i, (seq_id, q_i, k_i, v_i, pos_i) in enumerate(new):
            if source != layer:  # it keeps no KV of its own: its queries read the source layer's
                outs.append(self._prefill(q_i, pos_i, *self._held(seq_id, source), sliding_window)[0])
                continue
            m = sum(self.scoring_passes[i])  # a scoring pass is written when it runs, and dropped
            cached = len(q_i) - m
            slots = self.cache.append_slots(seq_id, cached, layers=slice(layer, layer + 1))[0]
            self.cache.write(slots.to(pool.device), k_i[:cached], v_i[:cached], pos_i[:cached])
            if self.method is None:
                outs.append(self._prefill(q_i, pos_i, *self._held(seq_id, layer), sliding_window,
                                          slim=self._slim(seq_id, layer))[0])
                self.cache.settle(seq_id, layers=slice(layer, layer + 1))
                continue
            # The prompt attends over itself, then is compressed. Tokens generated before a
            # preemption (recompute) then attend over the compressed prompt, as they did the
            # first time, so the recomputed cache is the one the sequence had.
            n = self.compress_lens[i]
            out, column_sums = self._prefill(q_i[:n], pos_i[:n], *self._held(seq_id, layer), sliding_window,
                                             self.method.needs_column_sums)
            outs.append(out)
            scoring = None
            if m:  # nothing follows a scoring pass in this forward (the runner's second pass)
                out, scoring = self._scoring_passes(layer, i, q_i[n:], k_i[n:], v_i[n:], pos_i[n:], sliding_window)
                outs.append(out)
            self._compress(layer, seq_id, q_i[:n], column_sums, i, scoring)
            if n + m < len(q_i):
                outs.append(self._generated(layer, i, q_i[n + m:], pos_i[n + m:], sliding_window))
            self.cache.settle(seq_id, layers=slice(layer, layer + 1))
        return torch.cat(outs)

    def _latent(self, layer, q, k, v, sliding_window):
        """Over a latent cache (LoRC, Palu): store the new tokens' latents, then attend with the keys
        the cache rebuilds from every latent it holds over the values' latents, and take the result
        through the value basis (nanokv/cache/latent_cache.py)."""
        cache, device = self.cache, self.cache.pool.device
        if self.is_decode:  # each sequence reserved the most slots any layer takes: this one's first
            m, b = int(cache.slots_per_token[layer]), len(self.seq_ids)
            slots = self.slots[layer].view(cache.num_kv_heads, b, -1)[:, :, :m].reshape(cache.num_kv_heads, b * m)
            cache.store(layer, slots, k, v, self.positions)
            out = torch.empty_like(q)
            for members, tables, lengths in self.groups:
                self.bytes_read += cache.read_bytes(lengths[layer])
                keys, values, k_pos, held = cache.read(layer, tables[layer], lengths[layer])
                latent_out = attend(q[members][:, None], self.positions[members][:, None], keys.to(q.dtype),
                                    values.to(q.dtype), k_pos, held, sliding_window)[:, 0]
                out[members] = cache.values_out(layer, latent_out).to(q.dtype)
            return out
        outs = []
        for seq_id, q_i, k_i, v_i, pos_i in zip(self.seq_ids, q.split(self.query_lens), k.split(self.query_lens),
                                                v.split(self.query_lens), self.q_pos):
            slots = cache.append_slots(seq_id, len(q_i), layers=slice(layer, layer + 1))[0]
            cache.store(layer, slots.to(device), k_i, v_i, pos_i)
            keys, values, k_pos, held = cache.read(layer, *self._held(seq_id, layer))
            latent_out = attend(q_i[None], pos_i[None], keys.to(q.dtype), values.to(q.dtype), k_pos, held,
                                sliding_window)[0]
            outs.append(cache.values_out(layer, latent_out).to(q.dtype))
        return torch.cat(outs)

    def _selected_pages(self, q, tables, lengths):
        """Quest: score every held page of each head against the query (kernels.page_scores over
        the pool's key bounds), let the method pick the pages to read, and return the reduced
        tables [b, H, k] (the picked blocks in their order, -1 after) and lengths. The newest page
        is always picked, and being last it is the only partial one."""
        pool, bs, kernels = self.cache.pool, self.cache.block_size, self.cache.kernels
        kmin, kmax = pool.block_fields["kmin"], pool.block_fields["kmax"]
        self.bytes_read += int(tables.ge(0).sum()) * 2 * pool.head_dim * pool.dtype.itemsize  # the bounds read
        if kernels.quest_select is not None and isinstance(self.selector, Quest):
            # the same rule (Quest.select_pages) and tables in one C++ call: the torch steps below
            # cost several times the attention over the pages they keep (cpu_quest.cpp)
            return kernels.quest_select(q, kmin, kmax, tables, lengths, bs, self.selector.pages_to_read(bs))
        bounds = kernels.page_scores(q, kmin, kmax, tables)
        num_blocks = (lengths + bs - 1) // bs
        keep = self.selector.select_pages(bounds, num_blocks, bs)
        count = keep.sum(-1)
        width = int(count.max())
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]  # picked first, in order
        picked = tables.gather(-1, order)
        picked = picked.masked_fill(torch.arange(width, device=picked.device) >= count[..., None], -1)
        return picked, (count - 1) * bs + lengths - (num_blocks - 1) * bs

    def _held(self, seq_id: int, layer: int):
        """One sequence's tables [1, H, nb] and lengths [1, H] at `layer`, as attention takes them."""
        s, device = self.cache.seqs[seq_id], self.cache.pool.device
        return (s.tables[layer:layer + 1, :, :int(s.num_blocks[layer].max())].to(device),
                s.lengths[layer:layer + 1].to(device))

    def finish(self):
        """After the forward pass: shorten the heads that evicted a slot during this decode step;
        let a quantized cache quantize the residuals that have filled a block."""
        if self.evicting and self.is_decode:
            for i in self.evicted.any(dim=2).any(dim=0).nonzero().flatten().tolist():
                self.cache.drop_last(self.seq_ids[i], self.evicted[:, i])
        if self.quantized and self.is_decode:
            for seq_id in self.seq_ids:
                self.cache.settle(seq_id)

    def _slim(self, seq_id: int, layer: int):
        """A pruned cache's slim part of one sequence at `layer` (PrunedKVCache.slim_held), or None."""
        if not self.pruned:
            return None
        slim = self.cache.slim_held(seq_id, layer)
        return None if slim is None else tuple(t.to(self.cache.pool.device) for t in slim)

    def _prefill(self, q, q_pos, tables, lengths, sliding_window, column_sums=False, slim=None):
        """One sequence's queries [T, Hq, D] over its cached KV (tables [1, H, nb], lengths [1, H];
        `slim`: a pruned cache's slim part, _slim). -> (output, and with `column_sums` the attention
        each slot received [H, nb * block_size], summed over the queries and averaged over each
        kv-head's query heads)."""
        pool = self.cache.pool
        if slim is not None:
            f = pool.slim_fields
            return pruned_attention(q[None], q_pos[None], f["k"], f["v"], f["pos"], *slim, pool.k, pool.v, pool.pos,
                                    tables, lengths, sliding_window)[0], None
        cu_seqlens = torch.tensor([0, len(q)], dtype=torch.int32, device=q.device)
        result = self.cache.kernels.prefill(q, q_pos, cu_seqlens, pool.k, pool.v, pool.pos, tables, lengths,
                                            sliding_window, obs_window=len(q) if column_sums else None)
        if not column_sums:
            return result, None
        out, sums = result                                                 # sums [1, Hq, S]
        return out, sums[0].view(tables.shape[1], -1, sums.shape[-1]).mean(dim=1)

    def _generated(self, layer, i, q, q_pos, sliding_window):
        """A recompute's generated tokens over the compressed prompt. A decode-time method evicted
        as each of them was decoded: replay that one token at a time, so the cache ends as it was."""
        seq_id = self.seq_ids[i]
        if not self.evicting:
            return self._prefill(q, q_pos, *self._held(seq_id, layer), sliding_window,
                                 slim=self._slim(seq_id, layer))[0]
        pool, outs = self.cache.pool, []
        for q_t, pos_t in zip(q, q_pos):
            tables, lengths = self._held(seq_id, layer)
            out, probs = self.cache.kernels.decode(q_t[None], pos_t[None], pool.k, pool.v, pool.pos, tables, lengths,
                                                   sliding_window, True)
            evicted = self._evict(layer, tables, lengths, probs, pos_t[None], self.budgets[i:i + 1],
                                  self.prompt_lens[i:i + 1])
            self.cache.drop_last(seq_id, evicted.to(HOST), layers=slice(layer, layer + 1))
            outs.append(out)
        return torch.cat(outs)

    def _scoring_passes(self, layer, i, q, k, v, q_pos, sliding_window):
        """A method's scoring passes for sequence i at `layer`, each over the prompt and itself:
        written after the prompt, attended, then dropped before the next one.
        -> (their outputs, (queries [m, Hq, D], keys [H, m, D], tokens of each pass))."""
        seq_id, lengths, pool = self.seq_ids[i], self.scoring_passes[i], self.cache.pool
        layers, outs, keys, start = slice(layer, layer + 1), [], [], 0
        for length in lengths:
            part = slice(start, start + length)
            held = int(self.cache.seqs[seq_id].lengths[layer].max())  # every head: a prefill's prompt
            slots = self.cache.append_slots(seq_id, length, layers=layers)[0]
            self.cache.write(slots.to(pool.device), k[part], v[part], q_pos[part])
            tables, lens = self._held(seq_id, layer)
            outs.append(self._prefill(q[part], q_pos[part], tables, lens, sliding_window)[0])
            keys.append(gather_blocks(pool.k, tables[0])[:, held:held + length])
            self.cache.drop_last(seq_id, torch.full((1, tables.shape[1]), length, device=HOST), layers=layers)
            start += length
        return torch.cat(outs), (q, torch.cat(keys, dim=1), lengths)

    def _compress(self, layer: int, seq_id: int, queries: torch.Tensor, column_sums: torch.Tensor | None, i: int = 0,
                  scoring: tuple | None = None):
        """Let the method pick what layer `layer` of a just-prefilled sequence keeps, and set its
        per-token state; compact. Nothing else in this forward pass reads this layer's KV again.
        `scoring`: what a method's scoring passes left it (_scoring_passes)."""
        from nanokv.methods.base import PrefillView

        pool, s = self.cache.pool, self.cache.seqs[seq_id]
        n, held = len(queries), int(s.lengths[layer].max())
        tables = s.tables[layer, :, :int(s.num_blocks[layer].max())].to(pool.device)
        keys = gather_blocks(pool.k, tables)[:, :n]                             # [H, S, D] the prompt's
        positions = gather_blocks(pool.pos, tables[:1])[0, :n]                 # [S]
        view = PrefillView(layer, self.cache.num_layers, queries, keys, positions,
                           None if column_sums is None else column_sums[:, :n], self.sequence_state[seq_id])
        if scoring is not None:
            view.scoring_queries, view.scoring_keys, view.scoring_lengths = scoring
        if self.method.needs_values:
            view.values = gather_blocks(pool.v, tables)[:, :n]                 # [H, S, D] the prompt's
        if self.method.needs_vocabulary:
            if self.token_ids is None or held != len(self.token_ids[i]):
                raise ValueError(f"method {self.method.name!r} needs the token ids of a prefill from an empty cache")
            view.token_ids = self.token_ids[i][:n]  # a prefill writes its tokens from slot 0, in order
        prompt = self.cache.flat_slots(tables, torch.arange(n, device=pool.device).expand(len(tables), n))
        for name, value in self.method.state_of(view).items():
            pool.fields[name][pool.slot_index(prompt)] = value.to(pool.fields[name].dtype)
        keep = self.method.keep_mask(view)
        if keep is not None and self.method.merges:  # what goes is folded into what stays (base.py)
            for name, value in self.method.merge(view, keep).items():
                pool.fields[name][pool.slot_index(prompt)] = value.to(pool.fields[name].dtype)
        masks = {} if keep is None else {layer: keep}
        masks.update(self.method.earlier_keep_masks(view))  # a cascade re-trims earlier layers (base.py)
        for at, kept in masks.items():
            kept = kept.to(HOST)  # block tables live on the host
            generated = torch.ones(kept.shape[0], held - n, dtype=torch.bool, device=HOST)
            self.cache.compact(seq_id, torch.cat([kept, generated], dim=1)[None], layers=slice(at, at + 1))
        if self.pruned:  # the older kept tokens' keys keep the channels the method picks (ThinK)
            prompt = torch.full((view.keys.shape[0],), n, device=HOST) if keep is None else keep.sum(-1).to(HOST)
            self.cache.prune(seq_id, layer, self.method.key_channels(view, keep).to(HOST),
                             (prompt - self.method.recent).clamp(min=0))

    def _evict(self, layer, tables, lengths, probs, q_pos, budgets, prompt_lens) -> torch.Tensor:
        """Decode-time eviction for b sequences at one layer (tables [b, H, nb], lengths [b, H]):
        the method scores every slot from the query's attention probs [b, H, group, S] and a
        DecodeStep (updating its slot fields of the slots the query sees); each head holding more
        than its budget (decode_budgets) of tokens up to `q_pos` evicts its lowest-scoring one
        outside the recent window, first letting a merging method fold it into the slots that
        stay, then moving its last slot into that place. -> [b, H] bool, the heads that evicted
        (the caller shortens them)."""
        from nanokv.methods.base import DecodeStep

        pool = self.cache.pool
        fields = pool.fields
        B, H, _, S = probs.shape
        bs = pool.block_size
        # every slot of each head's table, in order: flat_slots over all of them, as a broadcast add
        flat = (tables[..., None] * bs + torch.arange(bs, device=tables.device)).flatten(-2)  # padding: < 0
        held = torch.arange(S, device=probs.device) < lengths[..., None]

        def read(field):  # [b, H, S, ...]: whole blocks through index_select where the field's blocks are
            # rows (~10x faster on CPU than advanced indexing slot by slot, which took most of a
            # layer's eviction); padding reads block 0, which `visible` leaves out
            if field.is_contiguous():
                return gather_blocks(field, tables)
            return field[pool.slot_index(flat.clamp(min=0))]

        k_pos = read(fields["pos"])
        visible = held & (k_pos <= q_pos[:, None, None])     # a replay holds later tokens already
        step = DecodeStep(layer, q_pos, prompt_lens, k_pos, visible, budgets)
        if "keys" in self.method.decode_reads:     # [b, H, S, D] in slot order (base.py)
            step.keys = read(fields["k"])
        if "values" in self.method.decode_reads:
            step.values = read(fields["v"])
        state = {name: read(fields[name]) for name in self.method.slot_fields}
        scores, new = self.method.decode_scores(probs, state, step)
        for name, value in new.items():  # a replay's later tokens keep theirs (see base.py)
            fields[name][pool.slot_index(flat[visible])] = value[visible]
        state.update(new)
        over = visible.sum(-1) > self.method.decode_budgets(state, step)
        if not bool(over.any()):
            return over
        recent = self.method.recent_window(budgets)
        eligible = visible & (k_pos <= (q_pos - recent)[:, None, None])
        scores = scores.masked_fill(~eligible, float("inf"))
        lowest = scores.min(dim=-1, keepdim=True).values
        # ties go to the oldest token, whatever slot it sits in, so a replay picks as the decode did
        oldest_lowest = k_pos.masked_fill(~eligible | (scores != lowest), torch.iinfo(k_pos.dtype).max)
        victim = oldest_lowest.argmin(dim=-1)
        if self.method.merges:  # fold the victims into the slots that stay (base.py)
            into = visible & over[..., None]
            for name, value in self.method.merge_evicted(victim, over, state, step).items():
                fields[name][pool.slot_index(flat[into])] = value[into].to(fields[name].dtype)
        last = (lengths - 1).clamp(min=0)
        src = flat.gather(-1, last[..., None])[..., 0][over]
        dst = flat.gather(-1, victim[..., None])[..., 0][over]
        self.cache.move_slots(src, dst)
        return over


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
