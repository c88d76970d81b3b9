"""snapkv: keep what the last prompt tokens attend to.

Paper: SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024),
arXiv 2404.14469. The last `window_size` queries of the prompt (the observation window) already
attend to what generation will need. Per layer: their softmax attention over the prefix
(causal inside the window), averaged over the window queries, smoothed per query head by 1-D
pooling (padding kernel_size // 2, stride 1), then averaged over the query heads that share a
kv-head (GQA); keep the top (budget - window) prefix tokens per kv-head plus the window itself.
Defaults window_size=32, max pooling, kernel_size=7: the paper's LongBench configs
(FasterDecoding/SnapKV @ e216ddc, experiments/LongBench/config/*_w32_k7_maxpool.json; its
class defaults are 64 / avg / 5, as are kvpress's SnapKVPress's).

What differs:
- GQA: the official code repeats the kv-heads and selects per query head (a cache Hq heads
  wide); here one selection per kv-head, pooled per query head then averaged over the group, as
  kvpress does (pyramidkv and adakv average first, as their official GQA modes do).
- Scores stay float32; the official code and kvpress cast the softmax back to the model dtype
  (in bf16/fp16 near-ties can fall the other way).
- A budget at most the window (only reachable with compression; the official code refuses it)
  keeps an arbitrary part of the window.
"""

import torch
import torch.nn.functional as F

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention


class SnapKV(PrefillSelector):
    name = "snapkv"
    description = "keep the tokens the prompt's last queries attend to most (pooled, per head)"
    paper = "https://arxiv.org/abs/2404.14469"
    options = {
        "window_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
        "pooling": (str, "max", "'max' or 'avg'", lambda v: v in ("max", "avg")),
    }
    group_mean_before_pooling = False  # GQA: pool each query head, then average the group (kvpress)

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name}")

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S, _ = view.keys.shape
        window = min(self.window_size, S)
        P = S - window                                                       # the prefix
        attention = observation_attention(view, window).mean(dim=1)[:, :P]   # [Hq, P]
        if self.group_mean_before_pooling:
            attention = attention.view(H, -1, P).mean(dim=1) if P else attention[:H]
        if P:
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            attention = pool(attention[:, None, :], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
        pooled = attention.view(H, len(attention) // H, P).mean(dim=1)      # GQA: mean over the group
        window_scores = torch.full((H, window), float("inf"), device=pooled.device)  # the window is always kept
        return torch.cat([pooled, window_scores], dim=1)
