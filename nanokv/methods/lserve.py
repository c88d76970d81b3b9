"""lserve: streaming heads read their sinks and recent pages, the others a reused top of physical pages.

Paper: LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention (Yang, Guo, Tang
et al., MLSys 2025), arXiv 2502.14866. Decode attention is sparse in two ways at once:
- static: a share `static_sparsity` of the model's (layer, kv-head) pairs are streaming heads, by
  DuoAttention's head scores (the lowest-scoring pairs of the whole model). A streaming head reads
  its first `sink_size` tokens and its newest `local_size` ones.
- dynamic: every other (retrieval) head reads a budget of pages chosen by hierarchical paging. A
  logical page (a cache block of block_size tokens) carries its keys' per-channel min and max; a
  physical page is `logical_pages` consecutive logical pages. For a query q, a logical page's
  bound is Quest's sum_c max(q_c max_c, q_c min_c); a physical page's importance is the highest
  bound of its logical pages. The head reads its newest physical page and the K - 1 others of
  highest importance, K = max(min_pages, budget // physical page tokens), all of them while its
  history (tokens before the query) is at most the budget.
- the selection is made when the query's position is a multiple of `interval` and reused, per
  layer, by the decode steps in between (their queries read no bounds).

Defaults from the official code (mit-han-lab/omniserve @ 02b2925): omniserve/engine/arg_utils.py
(block_size 64 = a physical page, sub_chunk_per_block 4 = logical pages per physical page, a token
budget of 4096, selector_update_interval 4) and scripts/lserve_e2e.sh (static_sparsity 0.5, decode
sink 128 and local 256); the pick (max over sub-chunks, the newest page always, at least 3 pages,
all pages while the history fits the budget, the reuse rule) from
omniserve/modeling/layers/decoding_attention.py and the selector kernel
(kernels/csrc/fused_attention/sparse_utils/KVPageSelector). No layer stays dense. With nanokv's
16-token blocks a physical page is 64 tokens, as the official one.

The head scores are DuoAttention's: `calibration = "duoattention"`, the artifact of
`python -m nanokv.calibrate duoattention --model ...` (nanokv/calibrate/), per (layer, kv-head), as
the official full_attention_heads.tsv. There is no `lserve` calibration command: it would write the
same profile. With static_sparsity=0 no head streams and no calibration is needed.

What differs:
- a budget below the official 4,096 shrinks the streaming heads' `sink_size` and `local_size` in
  proportion (budget 256: 8 and 16) unless they are given, so that every head reads about the
  budget; the official sizes are fixed.
- head scores are kvpress's training-free approximation of DuoAttention's (nanokv's duoattention
  profile), not the trained gates of the official attn_patterns/.
- the streaming count is ceil(static_sparsity (N - 1)) of the N pairs, as the official
  np.quantile threshold gives, with ties broken by (layer, head) order, not by U(0, 1e-6) noise.
- GQA: one selection per kv-head, ranked by the highest bound of its query heads, which all of the
  group read (the cache stores kv-heads); the official selector ranks and reads per query head.
- a streaming head reads whole blocks: those holding its first sink_size tokens and those
  holding its newest local_size (up to one block more than sink + local tokens).
- on a reused step a head also reads the current newest physical page; the official kernel keeps
  the selection's newest page index, stale once a new page opens before the next selection.
- the reuse clock is each sequence's own position; the official one is the batch's longest
  sequence (one selection per layer for the whole batch, reset at any prefill).
- prefill is dense (LServe's block-sparse prefill is not built), and the cache keeps every token of
  every head in the pool's dtype (LServe's streaming heads hold only sink + local, quantized KV).
- a recompute after preemption runs its generated tokens densely (as prefill) and starts the
  reused selections afresh.
"""

import math

import torch

from nanokv.methods.base import CALIBRATION_FILE, PageReader, Picks, ReadStep, scaled_windows, slot_mask, top_slots


class LServe(PageReader):
    name = "lserve"
    description = "streaming heads read sinks + recent pages; the others a reused top of physical pages by key bounds"
    paper = "https://arxiv.org/abs/2502.14866"
    default_budget = 4096
    reads_bounds = True
    calibration = "duoattention"
    options = {
        "static_sparsity": (float, 0.5, "a number in [0, 1] (the share of kv-heads that stream)",
                            lambda v: 0 <= v <= 1),
        "sink_size": (int, 128, "an integer >= 0", lambda v: v >= 0),
        "local_size": (int, 256, "an integer >= 1", lambda v: v >= 1),
        "logical_pages": (int, 4, "an integer >= 1 (logical pages per physical page)", lambda v: v >= 1),
        "interval": (int, 4, "an integer >= 1 (decode steps a selection serves)", lambda v: v >= 1),
        "min_pages": (int, 3, "an integer >= 1 (physical pages)", lambda v: v >= 1),
        "calibration_file": CALIBRATION_FILE,
    }
    head_scores: torch.Tensor | None = None  # [L, H] from bind_calibration

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        options = scaled_windows(options, budget, self.default_budget, {"sink_size": 128, "local_size": 256},
                                 least=1)
        super().__init__(compression, budget, **options)
        if self.static_sparsity == 0:
            self.calibration = None  # no head streams: nothing to read the scores for

    def bind_calibration(self, artifact: dict):
        self.head_scores = torch.tensor(artifact["head_scores"], dtype=torch.float64, device="cpu")
        N = self.head_scores.numel()
        # the heads below np.quantile(scores, static_sparsity) (distinct scores), every head at 1
        count = N if self.static_sparsity == 1 else math.ceil(self.static_sparsity * (N - 1))
        lowest = torch.argsort(self.head_scores.flatten(), stable=True)[:count]
        self.streaming = torch.zeros(N, dtype=torch.bool, device="cpu").index_fill_(0, lowest, True).view(
            self.head_scores.shape)

    def streaming_heads(self, layer: int, H: int, device) -> torch.Tensor:
        """[H] bool: the kv-heads of `layer` that stream."""
        if self.static_sparsity == 0:
            return torch.zeros(H, dtype=torch.bool, device=device)
        if self.head_scores is None:
            raise ValueError(f"method {self.name!r} has no calibration: bind_calibration first (LLM does; make one "
                             f"with python -m nanokv.calibrate {self.calibration}, or give static_sparsity=0)")
        return self.streaming[layer].to(device)

    def physical_pages_to_read(self, block_size: int) -> int:
        return max(self.min_pages, self.budget // (self.logical_pages * block_size))

    def select(self, step: ReadStep) -> torch.Tensor:
        """[b, H, n_phys] bool: each head's physical pages by this step's query (no reuse)."""
        kmin, kmax = step.bounds
        b, H, nb, D = kmin.shape
        P = self.logical_pages
        n_phys = -(-nb // P)
        q = step.queries.float().view(b, H, -1, 1, D)
        bound = torch.maximum(q * kmax.float()[:, :, None], q * kmin.float()[:, :, None]).sum(-1).amax(2)  # [b, H, nb]
        page = torch.arange(nb, device=kmin.device)
        bound = bound.masked_fill(page * step.block_size >= step.lengths[..., None], float("-inf"))
        importance = torch.nn.functional.pad(bound, (0, n_phys * P - nb), value=float("-inf"))
        importance = importance.view(b, H, n_phys, P).amax(-1)
        phys = torch.arange(n_phys, device=kmin.device)
        newest = ((step.lengths - 1) // (P * step.block_size))[..., None]
        others = top_slots(importance.masked_fill(phys == newest, float("-inf")),
                           self.physical_pages_to_read(step.block_size) - 1)
        chosen = slot_mask(others, n_phys) | (phys == newest)
        dense = (step.lengths - 1 <= self.budget)[..., None]  # the history fits the budget: every page
        return torch.where(dense, phys <= newest, chosen)

    def pick(self, step: ReadStep) -> Picks:
        kmin = step.bounds[0]
        b, H, nb, D = kmin.shape
        bs, P, device = step.block_size, self.logical_pages, kmin.device
        n_phys = -(-nb // P)
        phys = torch.arange(n_phys, device=device)
        newest = (step.lengths - 1) // (P * bs)
        streaming = self.streaming_heads(step.layer, H, device)
        renew = [state.get(step.layer) is None or int(position) % self.interval == 0
                 for state, position in zip(step.states, step.positions.tolist())]
        fresh = self.select(step) if any(renew) else None
        chosen, scored = [], 0
        for i, state in enumerate(step.states):
            kept = state.get(step.layer)
            if renew[i]:
                state[step.layer] = fresh[i].clone()
                # the bounds of every page of the retrieval heads that ranked them
                ranked = ~streaming & (step.lengths[i] - 1 > self.budget)
                scored = scored + ((step.lengths[i] + bs - 1) // bs)[ranked].sum() * (2 * D * kmin.element_size())
                chosen.append(fresh[i])
            else:  # a reused selection, with the newest page, which may have opened since
                kept = torch.nn.functional.pad(kept, (0, n_phys - kept.shape[-1]))
                chosen.append(kept | (phys == newest[i][:, None]))
        page = torch.arange(nb, device=device)
        held = page * bs < step.lengths[..., None]
        retrieval = torch.stack(chosen).repeat_interleave(P, dim=-1)[..., :nb]
        window = (page * bs < self.sink_size) | ((page + 1) * bs > step.lengths[..., None] - self.local_size)
        read = torch.where(streaming[:, None], window, retrieval) & held
        k = int(read.sum(-1).max())
        pages = torch.where(read, page, nb).sort(dim=-1).values[..., :k]
        return Picks(pages=pages.masked_fill(pages == nb, -1), scored_bytes=scored)
