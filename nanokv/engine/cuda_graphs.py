"""DecodeGraphs: a decode step's forward pass captured as a CUDA graph and replayed, as nano-vllm
and vLLM do.

Eagerly, a decode step launches a few hundred small kernels (per layer: norms, projections, RoPE,
the KV write, attention, the MLP), and on a GPU each launch costs the host more than the kernel
takes: at batch 1 a 1B model's step is launch-bound. A CUDA graph records those launches once, with
every tensor at a fixed address, and replays them in one call.

So each graph owns static input buffers (ids, positions, the new tokens' slots, the batch's block
tables and lengths) and its output (the final hidden states, the KV bytes attention read). A step
copies its inputs in and replays. Graphs are captured when first needed, one per
- batch bucket: 1, 2, 4, 8, then every 16 up to max_num_seqs (nano-vllm's); a batch of 5 runs
  in the graph of 8, and
- table width: the columns of the batch's tables, rounded up to a power of two, and
- for a method that evicts during decode, the rounds of eviction each layer runs: the host counts
  them from its lengths and the budgets before the step (a head over budget by n evicts n), and a
  steady decode evicts one a layer or none, so a run needs a few such patterns. A step that
  catches up by more than one runs eagerly;
and share one memory pool; their tables buffers are views of one storage (only one graph replays
at a time), so wider and wider tables do not each keep a buffer of their own. A batch whose tables
are wider than `max_len_to_capture` tokens (8192, vLLM's former default of the same name) runs
eagerly: its attention outweighs the launches a graph saves, and the storage stays bounded
(`most_table_bytes`, which the engine sets aside before sizing the KV pool). The rows a batch
does not fill are padding: length 0 (attention reads nothing), position 0, and their new K/V go to
a scratch block that no table holds. Their outputs are garbage nobody reads; a decode's rows never
mix.

The first step of a graph runs eagerly over its buffers (a warm-up, which compiles the Triton kernels
for these shapes) and is then recorded; that step's result is the warm-up's, and the graph replays
from the next step on. Running the step twice would evict twice.

What cannot be captured runs eagerly, and `eager_reason` says why (the engine's stats show it):
a method whose budgets are state on the device (how many it evicts is counted there), a block kind that
attends in groups of similar length or whose read waits for the GPU, kernels other than Triton, a
CPU. On a CPU the same static buffers run without capture when asked (`capture=False`), which is
how the tests check the padding and the buffers without a GPU. A capture that fails (something in the step waits for
the GPU, which a capture forbids, or memory runs out) turns capturing off for the rest of the run,
with the error as the reason: the step keeps its warm-up's result, and every later one runs
eagerly over the same buffers. The stats count a step that captured as eager (its warm-up ran it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


MAX_LEN_TO_CAPTURE = 8192  # tokens a head's tables may span in a captured step


def widest_table(max_len_to_capture: int, block_size: int) -> int:
    """The widest tables (blocks, a power of two) a graph is captured for."""
    return 1 << max(0, -(-max_len_to_capture // block_size) - 1).bit_length()


def most_table_bytes(num_layers: int, num_kv_heads: int, max_num_seqs: int, block_size: int,
                     max_len_to_capture: int = MAX_LEN_TO_CAPTURE) -> int:
    """The most bytes the graphs' tables storages take together: each grows by doubling up to the
    widest graph of the largest bucket, and a graph captured on an older one keeps it alive (a sum
    of doublings: under twice the last)."""
    return 2 * num_layers * max_num_seqs * num_kv_heads * widest_table(max_len_to_capture, block_size) * 8


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes a graph is captured for: 1, 2, 4, 8, then multiples of 16, and max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def eager_reason(method, cache, kernels_name: str, device, enforce_eager: bool) -> str | None:
    """Why decode steps with this method, cache and kernels run eagerly; None: they are captured."""
    if enforce_eager:
        return "enforce_eager is set"
    if torch.device(device).type != "cuda":
        return "CUDA graphs need a CUDA device"
    if kernels_name != "triton":
        return f"the {kernels_name!r} kernels (graphs replay the Triton ones)"
    if method is not None and method.evicts_during_decode and method.budgets_from_state:
        return (f"{method.name} evicts during decode by budgets the cache holds: a layer reads back how many "
                "each head evicts")
    if method is not None and method.offloads:
        return f"{method.name} recalls what each step reads from host memory, a gather the host makes from the picks"
    if method is not None and method.selects_pages and not method.picks_by_bounds:
        return f"{method.name} picks what each step reads in plain torch, with state the host keeps per sequence"
    return cache.eager_decode_reason


@dataclass
class StaticStep:
    """One graph's buffers: its inputs, filled before every replay, and its outputs."""
    ids: torch.Tensor        # [B]
    positions: torch.Tensor  # [B]
    members: torch.Tensor    # [B]: 0 .. B - 1, the batch's rows (Quest's pick indexes with it)
    slots: torch.Tensor      # [L, H, B]: the new tokens' slots
    tables: torch.Tensor     # [L, B, H, width]
    lengths: torch.Tensor    # [L, B, H]
    budgets: torch.Tensor | None = None      # [B]: an evictor's budgets and prompt lengths
    prompt_lens: torch.Tensor | None = None  # [B]
    evicted: torch.Tensor | None = None      # [L, B, H]: what each head evicted (an output)
    graph: "torch.cuda.CUDAGraph | None" = None
    hidden: torch.Tensor | None = None       # [B, hidden]
    bytes_read: torch.Tensor | int = 0


class DecodeGraphs:
    def __init__(self, model, cache, max_num_seqs: int, capture: bool | None = None,
                 max_len_to_capture: int = MAX_LEN_TO_CAPTURE):
        """`capture` (default: on CUDA) records graphs; off, the static buffers run eagerly."""
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_num_seqs)
        self.widest = widest_table(max_len_to_capture, cache.block_size)
        self.capture = cache.pool.device.type == "cuda" if capture is None else capture
        self.steps: dict[tuple[int, int, tuple], StaticStep] = {}  # (bucket, width, rounds a layer)
        self.memory_pool = None  # shared by every graph
        self.scratch_slot = cache.reserve_scratch()  # where padding rows write their K/V
        self.replays = 0
        self.capture_s = 0.0  # time spent capturing (warm-up runs included)
        self.failure: str | None = None  # why a capture failed (capturing is then off)
        self.table_storage: torch.Tensor | None = None  # what every graph's tables are a view of

    def takes(self, attention) -> bool:
        """Whether this decode step fits a graph: one call over the whole batch, tables from the
        device mirror ([members, tables, lengths]); an evictor's, at most one round a layer."""
        evicting = attention.graph_evicting and max(attention.rounds[0], default=0) <= 1
        return ((attention.whole_batch or evicting) and len(attention.groups) == 1 and len(attention.groups[0]) == 3
                and len(attention.seq_ids) <= self.buckets[-1] and attention.groups[0][1].shape[-1] <= self.widest)

    def forward(self, attention) -> torch.Tensor:
        """The decode step's final hidden states [b, hidden], by replaying (or first capturing) the
        graph of its bucket."""
        b = len(attention.seq_ids)
        _, tables, _ = attention.groups[0]
        rounds = tuple(attention.rounds[0]) if attention.evicting else ()
        key = (next(size for size in self.buckets if size >= b), 1 << max(0, tables.shape[-1] - 1).bit_length(), rounds)
        step, first = self.steps.get(key), None
        if step is None:
            step = self.steps[key] = self._buffers(*key[:2], attention)
            self._load(step, attention)
            if self.capture:
                self._bind(step, attention)
                start = time.perf_counter()
                first = self._warm_up(step, attention)
                try:
                    self._record(step, attention)
                except RuntimeError as e:  # a wait for the GPU inside the step, or out of memory
                    # the warm-up has run the step (evictions included): its result stands, and
                    # raising would leave them unfinished
                    self.capture, self.failure = False, f"capturing a decode step failed: {e}"
                self.capture_s += time.perf_counter() - start
        else:
            self._load(step, attention)
        # a step counts as replayed when it was; the one that captured ran eagerly (the warm-up)
        self.replayed = first is None and step.graph is not None
        if first is not None:  # the warm-up ran this step: its result stands
            hidden, attention.bytes_read = first
        elif self.replayed:
            step.graph.replay()
            self.replays += 1
            hidden, attention.bytes_read = step.hidden, step.bytes_read
        else:  # not captured: the same buffers, eagerly
            self._bind(step, attention)
            hidden = self.model(step.ids, step.positions, attention)
        if attention.evicting:
            attention.evicted = step.evicted[:, :b]
        return hidden[:b]

    @staticmethod
    def _bind(step: StaticStep, attention):
        attention.bind(step.ids, step.positions, step.slots, step.members, step.tables, step.lengths,
                       step.budgets, step.prompt_lens, step.evicted)

    def _buffers(self, batch: int, width: int, attention) -> StaticStep:
        L, H = self.cache.num_layers, self.cache.num_kv_heads
        device, size = self.cache.pool.device, L * batch * H * width
        if self.table_storage is None or len(self.table_storage) < size:  # graphs before keep the old one
            most = L * self.buckets[-1] * H * self.widest
            grown = max(size, min(most, 2 * len(self.table_storage) if self.table_storage is not None else 0))
            self.table_storage = torch.full((grown,), -1, dtype=torch.int64, device=device)
        step = StaticStep(torch.zeros(batch, dtype=attention.ids.dtype, device=device),
                          torch.zeros(batch, dtype=attention.positions.dtype, device=device),
                          torch.arange(batch, device=device),
                          torch.full((L, H, batch), self.scratch_slot, dtype=attention.slots.dtype, device=device),
                          self.table_storage[:size].view(L, batch, H, width),
                          torch.zeros(L, batch, H, dtype=torch.int64, device=device))
        if attention.evicting:
            step.budgets = torch.ones(batch, dtype=attention.budgets.dtype, device=device)
            step.prompt_lens = torch.ones(batch, dtype=attention.prompt_lens.dtype, device=device)
            step.evicted = torch.zeros(L, batch, H, dtype=torch.long, device=device)
        return step

    def _load(self, step: StaticStep, attention):
        """Copy the step's inputs into the graph's buffers; the rows past the batch are padding."""
        b = len(attention.seq_ids)
        _, tables, lengths = attention.groups[0]
        step.ids[:b].copy_(attention.ids)
        step.ids[b:] = 0
        step.positions[:b].copy_(attention.positions)
        step.positions[b:] = 0
        step.slots[..., :b].copy_(attention.slots)
        step.slots[..., b:] = self.scratch_slot
        step.tables.fill_(-1)
        step.tables[:, :b, :, :tables.shape[-1]].copy_(tables)
        step.lengths[:, :b].copy_(lengths)
        step.lengths[:, b:] = 0
        if step.evicted is not None:  # a padding row holds nothing, so it evicts nothing
            step.budgets[:b].copy_(attention.budgets)
            step.prompt_lens[:b].copy_(attention.prompt_lens)
            step.budgets[b:], step.prompt_lens[b:] = 1, 1  # not 0: a method may divide by them
            step.evicted.zero_()

    def _warm_up(self, step: StaticStep, attention):
        """Run the step once eagerly over the graph's buffers, on a side stream on a GPU (Triton
        compiles its kernels for these shapes then: compiling inside a capture is not allowed)
        -> (hidden states, KV bytes read): this step's result."""
        if step.ids.device.type != "cuda":
            return self.model(step.ids, step.positions, attention), attention.bytes_read
        stream, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            first = self.model(step.ids, step.positions, attention), attention.bytes_read
        stream.wait_stream(side)
        return first

    def _record(self, step: StaticStep, attention):
        """Record the step as a graph (recording runs nothing): its outputs are the graph's from now
        on. The step holds the graph only once it is whole."""
        stream = torch.cuda.current_stream()
        try:
            attention.bytes_read = 0
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.memory_pool):
                step.hidden = self.model(step.ids, step.positions, attention)
                step.bytes_read = attention.bytes_read
            self.memory_pool, step.graph = graph.pool(), graph
        except BaseException:
            torch.cuda.set_stream(stream)  # a capture that fails leaves its own stream current
            torch.cuda.synchronize()
            raise
