"""kvmerger: keep heavy hitters and recent tokens; merge the similar neighbours of each into it.

Paper: Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks
(Wang et al., 2024), arXiv 2407.08454. Neighbouring tokens of a sequence often have near-equal
keys, so an evicted token whose run of similar neighbours reaches a token that stays can live
on inside it instead of being lost.

Per (layer, kv-head), at the end of prefill: the budget keeps H2O's choice, the newest
`recent_ratio` of it and the tokens with the most accumulated attention A (the prompt's column
sums, GQA averaged over the group). Outside the recent window, consecutive tokens whose keys
have cosine similarity above `threshold` form a merging set (a run: each token with the one
before it). Its pivot is its token with the most A, a kept one (the heavy hitters are the
tokens with the most A); the set's evicted tokens merge into it with Gaussian-kernel weights
w_i = exp(-|k_i - k_p|^2 / 2 sigma^2), w_p = 1: k_p <- (k_p + sum w_i k_i) / (1 + sum w_i), the
same weights for v. A set that keeps no token goes whole; its other kept tokens stay apart.

Defaults: threshold=0.8 (the paper's ≈0.75-0.8), recent_ratio=0.5 (H2O's heavy and recent
halves), sigma=0 (below). Paper only: no public code found (code index, GitHub repo names
kvmerger, pages and issues for arXiv 2407.08454; KVCache-Factory's merge="weighted" merges each
dropped token into its nearest kept key and is a different rule).
What differs:
- sigma=0 sets sigma^2, per set, to the mean |k_i - k_p|^2 of its evicted tokens, so the
  weights do not depend on the keys' scale (our choice; the paper's sigma is not reproduced); a
  positive sigma is used as is.
- one threshold for every layer; the paper calibrates it per layer.
- prefill only (decode tokens are kept, as SnapKV's); the recent window takes no part in merging.
- merging sets are runs of adjacent similar keys, the paper's identification reduced to its rule.
- the pivot must be a kept token, so the cache holds exactly the budget's tokens.
"""

import torch
import torch.nn.functional as F

from nanokv.methods.base import Merger, PrefillView


class KVMerger(Merger):
    name = "kvmerger"
    description = "keep heavy + recent tokens; merge the similar neighbours of each into it (Gaussian weights)"
    paper = "https://arxiv.org/abs/2407.08454"
    options = {
        "threshold": (float, 0.8, "a number in [-1, 1] (key cosine similarity that joins neighbours)",
                      lambda v: -1 <= v <= 1),
        "recent_ratio": (float, 0.5, "a number in [0, 1) (share of the budget kept for the newest tokens)",
                         lambda v: 0 <= v < 1),
        "sigma": (float, 0.0, "a number >= 0 (Gaussian kernel width; 0: per set, from its distances)",
                  lambda v: v >= 0),
    }
    needs_column_sums = True
    needs_values = True

    def recent(self, S: int) -> int:
        return int(self.tokens_to_keep(S) * self.recent_ratio)

    def scores(self, view: PrefillView) -> torch.Tensor:
        """H2O's: accumulated attention, the recent window above all."""
        scores = view.column_sums.float().clone()
        scores[:, scores.shape[1] - self.recent(scores.shape[1]):] = float("inf")
        return scores

    def merging_sets(self, keys: torch.Tensor, recent: int) -> torch.Tensor:
        """keys [H, S, D] -> [H, S] the index of each token's merging set, counted per head from 0: a
        run of tokens each with key cosine similarity above the threshold to the one before it. The
        last `recent` are sets of one."""
        H, S, _ = keys.shape
        unit = F.normalize(keys.float(), dim=-1)
        joins = (unit[:, 1:] * unit[:, :-1]).sum(-1) > self.threshold           # [H, S-1] token i+1 with i
        if recent:
            joins[:, S - recent - 1:] = False
        return torch.cat([torch.zeros(H, 1, dtype=torch.long, device=keys.device), (~joins).long().cumsum(-1)], dim=1)

    def merge(self, view: PrefillView, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        H, S, _ = view.keys.shape
        sets = self.merging_sets(view.keys, self.recent(S))
        pivot = set_pivots(sets, view.column_sums.float(), keep)
        keys = view.keys.float()
        return {name: gaussian_merge(x.float(), keys, sets, pivot, ~keep, self.sigma)
                for name, x in (("k", view.keys), ("v", view.values))}


def set_pivots(sets: torch.Tensor, attention: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[H, S] the slot of the pivot of each token's set: its kept token with the most attention
    (the first among equals), S where the set keeps none."""
    H, S = sets.shape
    flat = (sets + torch.arange(H, device=sets.device)[:, None] * S).flatten()  # one numbering over the heads
    kept_attention = attention.masked_fill(~keep, float("-inf")).flatten()
    best = torch.full((H * S,), float("-inf"), device=sets.device).scatter_reduce(0, flat, kept_attention, "amax")
    slots = torch.arange(S, device=sets.device).expand(H, S).flatten()
    candidate = torch.where(keep.flatten() & (kept_attention == best[flat]), slots, S)
    first = torch.full((H * S,), S, device=sets.device).scatter_reduce(0, flat, candidate, "amin")
    return first[flat].view(H, S)


def gaussian_merge(x: torch.Tensor, keys: torch.Tensor, sets: torch.Tensor, pivot: torch.Tensor,
                   evicted: torch.Tensor, sigma: float) -> torch.Tensor:
    """x [H, S, D] (keys or values) with each pivot replaced by the Gaussian-weighted mean of itself
    and the evicted tokens of its set: w_i = exp(-|k_i - k_p|^2 / 2 sigma^2), w_p = 1; with sigma 0,
    sigma^2 is per set the mean |k_i - k_p|^2 over those evicted tokens. Other slots unchanged."""
    H, S, D = x.shape
    slots = torch.arange(S, device=x.device)
    merging = evicted & (pivot < S)                                             # evicted, with a pivot to go to
    at = pivot.clamp(max=S - 1)
    distance = (keys - keys.gather(1, at[..., None].expand_as(keys))).pow(2).sum(-1)  # [H, S]
    if sigma > 0:
        width = torch.full_like(distance, sigma ** 2)
    else:
        total = torch.zeros_like(distance).scatter_add_(1, at, distance * merging)
        count = torch.zeros_like(distance).scatter_add_(1, at, merging.float())
        width = (total / count.clamp(min=1)).gather(1, at)
    weight = torch.exp(-distance / (2 * width.clamp(min=1e-30))) * merging      # the pivot's own weight is 1
    added = torch.zeros_like(x).scatter_add_(1, at[..., None].expand_as(x), weight[..., None] * x)
    total_weight = 1 + torch.zeros_like(distance).scatter_add_(1, at, weight)
    is_pivot = (pivot == slots)[..., None]
    return torch.where(is_pivot, (x + added) / total_weight[..., None], x)
