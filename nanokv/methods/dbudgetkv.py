"""dbudgetkv: prune each layer's prompt until the last query's attention would change by a threshold.

Paper: DBudgetKV: Dynamic Budget in KV Cache Compression for Ensuring Optimal Performance (Ni,
Xu et al., 2025), arXiv 2502.16886 (later versions: "ReFreeKV: Towards Threshold-Free KV Cache
Pruning"); official code Patrick-Ni/ReFreeKV @ cc68486 (modified_models/evict_utils.py,
H2OKVCluster; modified_models/dynamic_metrics.py, last_token_attn; scripts/run_refreekv.sh).
A fixed budget is right for some inputs and too small for others; instead each layer of each
prompt prunes as far as it can while its attention stays close to the full cache's:
- rank: the last W prompt tokens (the window) are always kept (the recency prior); the older
  tokens are ranked per head by the attention the window's queries give them (softmax over the
  prompt, causal inside the window, summed over the window's queries: the released
  --method h2o ranking);
- prune: drop the lowest-ranked tokens, i of them in every head, and measure how much of the last
  query's attention survives: with a_h that query's attention row of head h restricted to the
  ranked tokens (the window excluded), diff(i) = 1 - mean_h ||a_h without its i lowest||_2 /
  mean_h ||a_h||_2 (the Frobenius norm of a one-row attention matrix). The layer drops the
  largest i with diff(i) <= threshold (the released --metric last_token_attn).
So how many a layer keeps depends on the prompt and the layer, not on a budget.

The request's budget is a CAP: with budget=B (compression=r: ceil((1 - r) n)) only each head's
top B - W tokens are ranked and the rest dropped first, as the official max_capacity_prompt does
(its runs rank everything: --budget 1.0); so unlike other methods a prompt within the cap is
still pruned. For the paper's uncapped setting pass a budget of at least the longest prompt.
Memory is planned for the cap (kept_after_prefill), the most a layer can keep.
Defaults: threshold=0.05 (scripts/run_refreekv.sh and the README's --threshold default; the
paper's later version reports a 1% threshold for its metric), window_size=32 (init_H2O).

What differs:
- GQA: the official repeats the kv-heads (its cache Hq wide); here per kv-head, the ranking
  scores and the last query's attention each averaged over the group, the norms over kv-heads.
- The official metric's attention is in the model dtype; here float32.
- A cap at most the window (only through compression) keeps the newest B tokens.
- The other metrics of the official code (norm-1/2/fro over the whole prompt's attention
  matrix, found by bisection) and its StreamingLLM/SnapKV rankings are not offered.
- Prefill only, as the official (decoding grows the cache).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention


def dropped_by_threshold(attention: torch.Tensor, order: torch.Tensor, threshold: float) -> int:
    """How many of the lowest-ranked tokens every head drops: attention [H, S], the last query's;
    order [H, C] each head's ranked tokens, best first. The largest i < C whose
    1 - mean_h ||a_h[order_h[:C - i]]||_2 / mean_h ||a_h[order_h]||_2 is at most threshold."""
    squares = attention.gather(1, order).square()                       # [H, C] best first
    kept_norm = squares.cumsum(dim=1).sqrt().mean(dim=0)                # [C] the norm keeping the best c + 1
    diff = 1 - kept_norm / kept_norm[-1].clamp(min=torch.finfo(kept_norm.dtype).tiny)
    keeps = torch.nonzero(diff <= threshold).flatten()                  # keeping c + 1 is close enough
    return order.shape[1] - 1 - int(keeps.min()) if len(keeps) else 0


class DBudgetKV(PrefillSelector):
    name = "dbudgetkv"
    description = "per layer, prune the lowest-ranked tokens while the last query's attention norm drops <= threshold"
    paper = "https://arxiv.org/abs/2502.16886"
    options = {
        "threshold": (float, 0.05, "a number in [0, 1)", lambda v: 0 <= v < 1),
        "window_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
    }

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name}")

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        cap = self.tokens_to_keep(S)
        window = min(self.window_size, S)
        if S <= window:
            return None
        if cap <= window:                                   # the cap within the window: the newest
            return (torch.arange(S, device=view.keys.device) >= S - cap).expand(H, S).clone()
        P = S - window
        attention = observation_attention(view, window)                          # [Hq, W, S]
        rank = attention.sum(dim=1)[:, :P].view(H, -1, P).mean(dim=1)            # [H, P]
        last = attention[:, -1].view(H, -1, S).mean(dim=1)                       # [H, S]
        order = rank.topk(min(cap - window, P), dim=-1).indices                  # best first
        # the norms average over every kv-head of the layer: every rank's (RankHeads), one count for all
        kept = order.shape[1] - dropped_by_threshold(view.all_heads(last), view.all_heads(order), self.threshold)
        keep = torch.zeros(H, S, dtype=torch.bool, device=view.keys.device)
        keep.scatter_(1, order[:, :kept], True)
        keep[:, P:] = True
        return keep
