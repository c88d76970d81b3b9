"""Scheduler: which sequences run in the next forward step.

Two queues, as in nano-vllm. A step is a prefill when waiting sequences can be admitted
(bounded by a token budget, a sequence cap and free blocks), otherwise a decode of every
running sequence. When the pool runs dry during decode, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the waiting
queue, to be re-prefilled later from its prompt plus the tokens it has generated
(recompute). A request is never dropped for lack of blocks; one that could never fit even
alone is refused when it is added.

Each sequence may carry its own method (`Sequence.method`; engine/request_methods.py): a prefill
admits sequences of one method, and a decode runs the sequences that can share a step with the
oldest one whose turn it is; when methods with different decode-time roles run at once, their
decode steps take turns.

Under tensor parallelism (nanokv/distributed.py) every rank runs this scheduler over its own pool,
which holds its own heads' blocks, and every rank must make the same decisions: the same sequences
in each step, the same preemptions, or the ranks' collectives no longer pair up. The decisions are
a function of the queues (the same on every rank: the same requests, rank 0's sampled tokens) and
of block counts, which per-head compression (AdaKV, PyramidKV, H2O's evictions, a per-head
calibration) can leave different on different ranks. So each count is agreed before it is used,
the cautious way: free blocks are the fewest any rank has (MIN), the blocks a sequence needs the
most any rank needs (MAX), and the blocks a preemption frees the fewest any rank got back (MIN).
Every rank then decides as the tightest rank would: what it schedules fits on every rank. One
all-reduce per count read (a handful a step, on the host); on one process `agree` is the identity.
"""

from __future__ import annotations

from collections import deque

from nanokv.cache import PagedKVCache
from nanokv.engine.request_methods import RequestMethods
from nanokv.distributed import SINGLE
from nanokv.engine.sequence import Sequence


class RequestTooLarge(ValueError):
    """A request that could never run: its prompt and max_tokens need more than the whole pool
    (the server answers it with HTTP 413)."""


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int, method=None,
                 sharing=None, ranks=SINGLE):
        """sharing: a PrefixSharing (engine/prefix_sharing.py), or None: no prefix caching."""
        self.cache, self.method, self.sharing = cache, method, sharing
        self.ranks = ranks  # tensor parallelism's (nanokv/distributed.py): block counts agreed (module docstring)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.decode_turns = 0  # decode steps so far: whose turn it is when methods cannot share one
        self.num_preemptions = 0  # since the engine started (the server's /metrics)

    def method_of(self, seq: Sequence):
        """The sequence's own method, else the engine's."""
        return seq.method if seq.method is not None else self.method

    def check_fits(self, seq: Sequence):
        """Refuse a request that could not run even with the whole pool to itself."""
        longest = min(len(seq) + seq.params.max_tokens, seq.max_length)
        method = self.method_of(seq)
        if method is not None and method.prefill_chunk is not None:  # it never holds the whole prompt
            longest = min(longest, max(self.kept(seq)) + seq.params.max_tokens)
        need = max(self.cache.most_blocks(longest), self.prefill_blocks(seq))
        host_need = self.cache.host_blocks_for(len(seq))
        if host_need > self.cache.host_capacity_blocks:
            raise RequestTooLarge(
                f"a prompt of {len(seq)} tokens needs {host_need} host-tier blocks but the host pool holds "
                f"{self.cache.host_capacity_blocks}; raise host_cache_memory")
        if need > self.cache.pool.usable_blocks:
            raise RequestTooLarge(
                f"a request of {len(seq)} prompt tokens and max_tokens={seq.params.max_tokens} needs "
                f"{need} KV-cache blocks but the whole pool has {self.cache.pool.usable_blocks}; "
                f"raise kv_cache_memory (now {self.cache.pool.total_bytes} bytes) or lower max_tokens")

    def add(self, seqs: list[Sequence]):
        """Queue requests; if any could never fit, refuse them all before any is queued."""
        for seq in seqs:
            self.check_fits(seq)
        self.waiting.extend(seqs)

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """-> (sequences to run, is_prefill)."""
        admitted, tokens = [], 0
        # Keep back the blocks the running sequences need to cross their next block boundary,
        # so that a newly admitted (or just preempted) sequence is not preempted again at once.
        num_free, host_free = self.ranks.agree([self.cache.pool.num_free, self.cache.host_free_blocks], "min")
        free = num_free - len(self.running) * self.cache.blocks_to_append(None, 1)
        # host_free: a host tier's (host_tier.py): the prompt's older tokens go there
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            need, host_need = self.prefill_blocks(seq), self.cache.host_blocks_for(len(seq))
            if self.sharing is not None:  # what the prefix cache serves is not computed, nor allocated
                need = self.sharing.plan(seq, need)
            need, host_need = self.ranks.agree([need, host_need], "max")
            computed = len(seq) - seq.prefix_cached
            if need > free or host_need > host_free or (admitted and tokens + computed > self.max_num_batched_tokens):
                break
            if admitted and not RequestMethods.same_prefill(self.method_of(seq), self.method_of(admitted[0])):
                break  # a prefill step runs one method (request_methods.py); it goes in the next one
            free -= need
            host_free -= host_need
            tokens += computed
            self.cache.add(seq.id)
            if self.sharing is not None:
                self.sharing.attach(seq)
            admitted.append(self.waiting.popleft())
        if admitted:
            self.running.extend(admitted)
            return admitted, True

        # Decode: every running sequence that can share the step appends one token. Walk them oldest
        # first and preempt from the youngest end until the blocks they need are there.
        members = self._decode_members()
        scheduled, preempted = [], set()
        [free] = self.ranks.agree([self.cache.pool.num_free], "min")
        needs = self.ranks.agree(self.cache.blocks_to_append_each([seq.id for seq in members], 1), "max")
        for seq, need in zip(members, needs):
            if seq.id in preempted:  # preemption takes the youngest first: the rest went with it
                break
            while need > free and self.running[-1] is not seq:
                victim = self.running.pop()
                preempted.add(victim.id)
                free += self._preempt(victim)
            if need > free:  # it is the youngest left: it waits for the others to finish
                self._preempt(self.running.pop())
                break
            free -= need
            scheduled.append(seq)
        return scheduled, False

    def _decode_members(self) -> list[Sequence]:
        """The running sequences of this decode step, oldest first: all of them when their methods can
        share a step (the usual case), else the group whose turn it is."""
        groups: list[list[Sequence]] = []
        for seq in self.running:
            group = next((g for g in groups if RequestMethods.same_decode(self.method_of(g[0]), self.method_of(seq))),
                         None)
            if group is None:
                groups.append([seq])
            else:
                group.append(seq)
        self.decode_turns += 1
        return groups[self.decode_turns % len(groups)] if groups else []

    def prefill_blocks(self, seq: Sequence) -> int:
        """Most blocks the prefill of `seq` holds at once: its compressed part, and the rest (a
        question after the context, generated tokens on a recompute) whole; the layer running
        holds a method's scoring passes too, one at a time."""
        method = self.method_of(seq)
        if method is None or not (method.compresses or method.quantization or method.offloads):
            return self.cache.blocks_to_append(None, len(seq))
        kept = self.kept(seq)
        longest_pass = max((len(p) for p in seq.scoring_passes), default=0)
        whole = len(seq)
        if method.prefill_chunk is not None:  # a layer holds what earlier chunks left and one chunk
            whole = min(whole, max(kept) + method.prefill_chunk)
        return self.cache.prefill_blocks(whole + longest_pass, kept)

    def kept(self, seq: Sequence) -> list[int]:
        """Tokens each layer's heads hold once `seq` is prefilled: what the method keeps of its
        compressed part, and the rest whole."""
        n, L, method = seq.compress_len, self.cache.num_layers, self.method_of(seq)
        return [method.kept_after_prefill(n, layer, L) + len(seq) - n for layer in range(L)]

    def _preempt(self, seq: Sequence) -> int:
        """Free a running sequence's blocks and requeue it first -> blocks freed."""
        before = self.cache.pool.num_free  # seq_bytes may count more than blocks (a host tier's summaries)
        self.cache.free(seq.id)
        [freed] = self.ranks.agree([self.cache.pool.num_free - before], "min")
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return freed

    def finish(self, seq: Sequence):
        seq.kv_bytes = self.cache.seq_bytes(seq.id)
        seq.kv_bytes_theory = self.cache.theoretical_bytes(seq.id)
        seq.kv_bytes_uncompressed = self.cache.uncompressed_bytes(seq.num_cached)
        self.cache.free(seq.id)
        self.running.remove(seq)

    def abort(self, seq: Sequence):
        """Drop an unfinished request (its caller went away), giving its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free(seq.id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            if self.sharing is not None:
                self.sharing.forget(seq)
