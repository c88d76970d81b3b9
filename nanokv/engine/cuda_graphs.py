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
- table width: the columns of the batch's tables, rounded up to a power of two,
and share one memory pool; their tables buffers are views of one storage (only one graph replays
at a time), so wider and wider tables do not each keep a buffer of their own. The rows a batch
does not fill are padding: length 0 (attention reads nothing), position 0, and their new K/V go to
a scratch block that no table holds. Their outputs are garbage nobody reads; a decode's rows never
mix.

What cannot be captured runs eagerly, and `eager_reason` says why (the engine's stats show it):
a method that evicts during decode (the rounds of eviction a step runs vary), a block kind that
attends in groups of similar length or whose read waits for the GPU, kernels other than Triton, a
CPU. On a CPU the same static buffers run without capture when asked (`capture=False`), which is
how the tests check the padding and the buffers without a GPU. A capture that fails (something in the step waits for
the GPU, which a capture forbids) turns capturing off for the rest of the run, with the error as
the reason: the step, and every later one, runs eagerly over the same buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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
    if method is not None and method.evicts_during_decode:
        return f"{method.name} evicts during decode: the rounds of eviction a layer runs change from step to step"
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
    graph: "torch.cuda.CUDAGraph | None" = None
    hidden: torch.Tensor | None = None       # [B, hidden]
    bytes_read: torch.Tensor | int = 0


class DecodeGraphs:
    def __init__(self, model, cache, max_num_seqs: int, capture: bool | None = None):
        """`capture` (default: on CUDA) records graphs; off, the static buffers run eagerly."""
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_num_seqs)
        self.capture = cache.pool.device.type == "cuda" if capture is None else capture
        self.steps: dict[tuple[int, int], StaticStep] = {}
        self.memory_pool = None  # shared by every graph
        self.scratch_slot = cache.reserve_scratch()  # where padding rows write their K/V
        self.replays = 0
        self.capture_s = 0.0  # time spent capturing (warm-up runs included)
        self.failure: str | None = None  # why a capture failed (capturing is then off)
        self.table_storage: torch.Tensor | None = None  # what every graph's tables are a view of

    def takes(self, attention) -> bool:
        """Whether this decode step fits a graph: one call over the whole batch, tables from the
        device mirror ([members, tables, lengths])."""
        return (attention.whole_batch and not attention.evicting and len(attention.groups) == 1
                and len(attention.groups[0]) == 3 and len(attention.seq_ids) <= self.buckets[-1])

    def forward(self, attention) -> torch.Tensor:
        """The decode step's final hidden states [b, hidden], by replaying (or first capturing) the
        graph of its bucket."""
        b = len(attention.seq_ids)
        _, tables, _ = attention.groups[0]
        key = (next(size for size in self.buckets if size >= b), 1 << max(0, tables.shape[-1] - 1).bit_length())
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._buffers(*key, attention)
            self._load(step, attention)
            if self.capture:
                attention.bind(step.ids, step.positions, step.slots, step.members, step.tables, step.lengths)
                start = time.perf_counter()
                try:
                    self._capture(step, attention)
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as e:  # e.g. a wait for the GPU inside the step
                    self.capture, self.failure, step.graph = False, f"capturing a decode step failed: {e}", None
                    attention.bytes_read = 0
                self.capture_s += time.perf_counter() - start
        else:
            self._load(step, attention)
        self.replayed = step.graph is not None
        if self.replayed:
            step.graph.replay()
            self.replays += 1
        else:  # not captured: the same buffers, eagerly
            attention.bind(step.ids, step.positions, step.slots, step.members, step.tables, step.lengths)
            step.hidden = self.model(step.ids, step.positions, attention)
            step.bytes_read = attention.bytes_read
        attention.bytes_read = step.bytes_read
        return step.hidden[:b]

    def _buffers(self, batch: int, width: int, attention) -> StaticStep:
        L, H = self.cache.num_layers, self.cache.num_kv_heads
        device, size = self.cache.pool.device, L * batch * H * width
        if self.table_storage is None or len(self.table_storage) < size:  # graphs before keep the old one
            grown = max(size, 2 * len(self.table_storage) if self.table_storage is not None else 0)
            self.table_storage = torch.full((grown,), -1, dtype=torch.int64, device=device)
        return StaticStep(torch.zeros(batch, dtype=attention.ids.dtype, device=device),
                          torch.zeros(batch, dtype=attention.positions.dtype, device=device),
                          torch.arange(batch, device=device),
                          torch.full((L, H, batch), self.scratch_slot, dtype=attention.slots.dtype, device=device),
                          self.table_storage[:size].view(L, batch, H, width),
                          torch.zeros(L, batch, H, dtype=torch.int64, device=device))

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

    def _capture(self, step: StaticStep, attention):
        """Run the step once eagerly on a side stream (Triton compiles its kernels for these shapes
        then: compiling inside a capture is not allowed), then record it."""
        stream = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                self.model(step.ids, step.positions, attention)
            stream.wait_stream(side)
            attention.bytes_read = 0
            step.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(step.graph, pool=self.memory_pool):
                step.hidden = self.model(step.ids, step.positions, attention)
                step.bytes_read = attention.bytes_read
            self.memory_pool = step.graph.pool()
        except BaseException:
            torch.cuda.set_stream(stream)  # a capture that fails leaves its own stream current
            torch.cuda.synchronize()
            raise
