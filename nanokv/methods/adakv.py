"""adakv: per-head budgets from one layer-wide selection over SnapKV scores.

Paper: Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference (Feng et al., 2024), arXiv 2407.11550. Heads differ in how concentrated their
attention is, so a layer's total budget (budget x kv-heads) goes to the globally highest
scores across its heads instead of an equal share each. A safeguard keeps every head at least
`alpha_safeguard` x budget tokens (its own best ones). SnapKV scoring underneath; the window is
always kept. Defaults: alpha_safeguard=0.2 (paper and kvpress's AdaKVPress), window_size=32,
max pooling, kernel_size=7 (paper). Heads really end with different lengths, and each head's
tail blocks go back to the pool.
"""

import torch

from nanokv.methods.base import PrefillView, top_over_heads
from nanokv.methods.snapkv import SnapKV


class AdaKV(SnapKV):
    name = "adakv"
    description = "SnapKV scores, per-head budgets from a layer-wide top-k with a per-head floor"
    paper = "https://arxiv.org/abs/2407.11550"
    options = {**SnapKV.options,
               "alpha_safeguard": (float, 0.2, "a number in [0, 1]", lambda v: 0 <= v <= 1)}

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        per_head = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if per_head >= S:
            return None
        scores = self.scores(view).clone()
        floor = int(per_head * self.alpha_safeguard)
        if floor:  # each head's own best `floor` tokens win the layer-wide selection
            scores.scatter_(1, scores.topk(floor, dim=-1).indices, float("inf"))
        return top_over_heads(scores, per_head * H)
