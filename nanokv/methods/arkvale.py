"""arkvale: keep every page, most of them in host memory, and recall the pages a query may need.

Paper: ArkVale: Efficient Generative LLM Inference with Recallable Key-Value Eviction (Chen et
al., NeurIPS 2024), https://openreview.net/forum?id=4oAt5L4lYe; code pku-liang/ArkVale. Decoding
reads a small, changing part of the cache, and a page dropped now may matter later. ArkVale
keeps a digest of every page on the device (a bounding cuboid of its keys: per-channel max and
min), backs evicted pages up in host memory, and at each decode step estimates every page's
importance from the query and its digest, recalls the top pages into the device's budget and
drops the least important.
Per kv-head: the newest `device_window` tokens stay on the device and are always read; every
older page lives in the host tier, its digest on the device; a step scores each host page by the
cuboid's upper bound on q . k, sum_c max(q_c max_c, q_c min_c) (the highest over the kv-head's
query heads), and recalls the top (budget - device_window) / page_size pages.
Defaults: budget 2048 tokens (≈: the paper's budgets run 512 to 4096; we take the middle),
the cuboid-max estimate (the paper's best of its digests, ≈), dense first two layers (as Quest, ≈).

What differs:
- Pages are the cache's blocks, 16 tokens (the paper: 32; --block-size 32 gives its page).
- No cache of recalled pages on the device: a step recalls what it reads (the paper keeps a
  device budget of pages and recalls only those it lacks); the bytes moved are an upper bound.
- GQA: one page set per kv-head (the paper's models are MHA).
"""

import torch

from nanokv.methods.base import Offloader, Picks


class ArkVale(Offloader):
    name = "arkvale"
    description = "recallable pages: digests on the device, pages in host memory, the top pages recalled each step"
    paper = "https://openreview.net/forum?id=4oAt5L4lYe"
    default_budget = 2048
    summary_bounds = True
    options = {
        "skip_layers": (int, 2, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 64, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
    }

    def pick(self, step) -> Picks:
        kmin, kmax = step.bounds                                         # [b, H, P, D]
        b, H, P, D = kmin.shape
        q = step.queries.float().view(b, H, -1, D)                       # [b, H, g, D]
        bound = torch.maximum(q[:, :, :, None] * kmax.float()[:, :, None], q[:, :, :, None] * kmin.float()[:, :, None])
        scores = bound.sum(-1).amax(dim=2)                               # [b, H, P]
        pages = torch.arange(P, device=scores.device)
        held = pages * step.block_size < step.lengths[..., None]
        scores = scores.masked_fill(~held, float("-inf"))
        k = min(P, max(1, (self.budget - self.device_window) // step.block_size))
        top = scores.topk(k, dim=-1)
        picked = top.indices.masked_fill(top.values == float("-inf"), -1)
        return Picks(pages=picked, scored_bytes=held.sum() * (2 * D * step.itemsize))
