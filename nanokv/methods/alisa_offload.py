"""alisa_offload: ALISA's Sparse Window Attention over a host tier: the newest tokens on the device, the rest recalled by recent attention.

Paper: ALISA: Accelerating Large Language Model Inference via Sparsity-Aware KV Caching (Zhao,
Wu, Wang; ISCA 2024), arXiv 2403.17312, Section III (Sparse Window Attention; the GPU-CPU caching
phase of its dynamic scheduling). Paper only: no public code (see alisa.py).
SWA reads, per (layer, head), the locally static tokens (the newest) and the globally dynamic
ones (those the recent queries attended to most), picked again at every step; the tokens it
leaves out are not dropped: in ALISA's second phase they live in CPU memory and may be picked
again later. alisa.py is SWA as eviction (what it leaves out is gone); this is SWA as recall.
Per kv-head, for a budget B of tokens read per step: the newest local_ratio x B tokens stay on
the device (the device window, read whole); every older token lives in the host tier. A step
adds its query to a ring of the last `query_window` queries of the sequence (at that layer) and
scores each host token by the attention those queries give it, summed over the ring (softmax
over the host tokens each query may see, i.e. older than it; the query heads of a kv-head
averaged, as alisa.py), and recalls the B - local_ratio x B best. The ring (query_window x
query heads x D float32 per layer and sequence) lives in host memory, next to the keys it scores.
Defaults: as alisa.py, where they mean the same: local_ratio 0.5 (≈: our reading of Section
III-A), query_window 16 (nanokv's own); budget 1024 (nanokv's readers' default: the paper reports
KV sparsity, not a budget); every layer (skip_layers 0: SWA runs in every layer).

What differs:
- The scores are computed where the keys are: each step reads every host key in host memory
  (a search on the CPU, as RetrievalAttention's) and counts their bytes in scored_bytes; only
  the picked tokens move to the device. How ALISA scores the tokens it holds in CPU memory is our
  reading (≈: the abstracts and summaries we could read describe SWA and the three phases, not
  this detail); keeping an old score per host token instead would never pick one again.
- A query's attention is a softmax over the host tokens alone (the device window's keys are not
  in the pick's reach): within one query this ranks as the full softmax does; summed over the
  ring each query weighs by its host share instead.
- The ring starts empty at the first decode step (and again after a preemption's recompute):
  the prompt's last queries do not score the host tokens, as alisa.py's prefill does.
- Only the GPU-CPU caching phase: no first phase (all on the GPU until it fills: here tokens
  move as soon as they leave the window), no recomputation phase, no INT8 KV compression.
- No cache of recalled tokens on the device: a step recalls what it reads.
- GQA: one pick per kv-head (the paper's models are MHA).
"""

import math

import torch

from nanokv.methods.base import Offloader, Picks, top_slots


class ALISAOffload(Offloader):
    name = "alisa_offload"
    description = "ALISA's sparse window attention over a host tier: newest tokens on the device, the most attended recalled"
    paper = "https://arxiv.org/abs/2403.17312"
    default_budget = 1024
    options = {
        "local_ratio": (float, 0.5, "a number in [0, 1) (share of the budget kept on the device for the newest tokens)",
                        lambda v: 0 <= v < 1),
        "query_window": (int, 16, "an integer in [1, 256] (the recent queries whose attention is summed)",
                         lambda v: 1 <= v <= 256),
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_window = int(self.budget * self.local_ratio)  # the locally static part

    def state_bytes(self, state: dict) -> int:
        """None of the device's: the ring of recent queries lives in host memory, where the scoring runs."""
        return 0

    def pick(self, step) -> Picks:
        keys, positions = step.keys, step.key_positions                   # [b, H, S, D], [b, H, S]: on the host
        host = keys.device
        b, H, S, D = keys.shape
        held = step.held().to(host)
        q = step.queries.float().to(host)
        scores = torch.zeros(b, H, S, dtype=torch.float32, device=host)
        for i, state in enumerate(step.states):
            rings = state.setdefault("alisa_offload", {})
            ring_q, ring_pos = rings.get(step.layer, (q[:0], step.positions[:0].to(host)))
            ring_q = torch.cat([ring_q, q[i][None]])[-self.query_window:]             # [w, Hq, D]
            ring_pos = torch.cat([ring_pos, step.positions[i:i + 1].to(host)])[-self.query_window:]
            rings[step.layer] = (ring_q, ring_pos)
            w = ring_q.shape[0]
            logits = torch.einsum("whgd,hsd->whgs", ring_q.view(w, H, -1, D), keys[i].float()) / math.sqrt(D)
            unseen = ~held[i][None, :, None] | (positions[i][None, :, None] > ring_pos[:, None, None, None])
            probs = logits.masked_fill(unseen, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
            scores[i] = probs.sum(dim=0).mean(dim=1)                                  # [H, S]
        k = min(S, self.budget - self.device_window)
        picked = top_slots(scores.masked_fill(~held, float("-inf")), k)
        return Picks(slots=picked, scored_bytes=step.key_bytes())
