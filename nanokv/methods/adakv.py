"""adakv: per-head budgets from one layer-wide selection over SnapKV scores.

Paper: Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference (Feng et al., 2024), arXiv 2407.11550. Heads differ in how concentrated their
attention is, so a layer's budget (budget x kv-heads) goes to the highest scores across its
heads instead of an equal share each, with a safeguard (`alpha_safeguard`) so that no head
starves. SnapKV scores underneath; the window is always kept. Heads really end with different
lengths, and each head's tail blocks go back to the pool. Two allocations (`allocation`):
- `kvpress` (default; kvpress's AdaKVPress): each head's own best int(alpha B) tokens first
  (the window among them), then the layer-wide top H x B.
- `official` (FFY0/AdaKV @ efe4e2e, AdaptiveSnapKVCluster): with B' = B - W prefix tokens a
  head and c_h head h's count in the layer-wide top H x B' of the prefix scores, head h keeps
  its top round((1 - alpha) c_h + int(alpha B')) prefix tokens plus the window, so a head's
  share is pulled toward B' (the total can differ from H x B by rounding).
Defaults window_size=32, max pooling, kernel_size=7, alpha_safeguard=0.2: the official LongBench
runs (experiments/LongBench/GQA_eval_longbench.sh, c*_w32_k7_maxpool configs, --floor_alpha 0.2;
config_compress's own default is 0.5); AdaKVPress's alpha is 0.2 too.

What differs:
- The default allocation is kvpress's, whose kept sets the parity run matches; `official` is an
  option. With a budget at most the window (only through compression) `official` falls back to it.
- GQA: the official default selects per query head; here per kv-head, the group's window
  attention averaged before pooling (its --gqa_support with gqa_func=mean, which that script
  runs; gqa_func=max is not offered).
"""

import torch

from nanokv.methods.base import PrefillView, top_over_heads
from nanokv.methods.snapkv import SnapKV


class AdaKV(SnapKV):
    name = "adakv"
    description = "SnapKV scores, per-head budgets from a layer-wide top-k with a per-head floor"
    paper = "https://arxiv.org/abs/2407.11550"
    options = {**SnapKV.options,
               "alpha_safeguard": (float, 0.2, "a number in [0, 1]", lambda v: 0 <= v <= 1),
               "allocation": (str, "kvpress", "'kvpress' or 'official'", lambda v: v in ("kvpress", "official"))}
    group_mean_before_pooling = True  # AdaKV's gqa_support, gqa_func=mean

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        per_head = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if per_head >= S:
            return None
        window = min(self.window_size, S)
        if self.allocation == "official" and per_head > window:
            return self.official_keep_mask(view, per_head - window, S - window)
        scores = self.scores(view).clone()
        floor = int(per_head * self.alpha_safeguard)
        if floor:  # each head's own best `floor` tokens win the layer-wide selection
            scores.scatter_(1, scores.topk(floor, dim=-1).indices, float("inf"))
        # the layer-wide top-k over every rank's heads (tensor parallelism: PrefillView.all_heads)
        scores = view.all_heads(scores)
        return view.own_heads(top_over_heads(scores, per_head * len(scores)))

    def official_keep_mask(self, view: PrefillView, base: int, prefix: int) -> torch.Tensor:
        """AdaptiveSnapKVCluster's allocation: `base` (B') prefix tokens a head on average, of
        `prefix`; each head's top round((1 - alpha) c_h + int(alpha B')) and the window."""
        scores = view.all_heads(self.scores(view))[:, :prefix]  # every rank's heads (tensor parallelism)
        H, S = len(scores), view.keys.shape[1]
        counts = torch.bincount(scores.flatten().topk(H * base).indices // prefix, minlength=H)
        caps = torch.round(counts * (1 - self.alpha_safeguard) + int(base * self.alpha_safeguard)).long()
        order = scores.argsort(dim=-1, descending=True)
        chosen = torch.arange(prefix, device=scores.device)[None, :] < caps[:, None]  # by rank
        keep = torch.ones(H, S, dtype=torch.bool, device=scores.device)
        keep[:, :prefix] = torch.zeros_like(chosen).scatter_(1, order, chosen)
        return view.own_heads(keep)
