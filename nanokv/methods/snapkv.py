"""snapkv: keep what the last prompt tokens attend to.

Paper: SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024),
arXiv 2404.14469. The last `window_size` queries of the prompt (the observation window) already
attend to what generation will need. Per layer: their softmax attention over the prefix
(causal inside the window), averaged over the window queries, smoothed by 1-D pooling per
query head, then averaged over the query heads that share a kv-head (GQA); keep the top (budget - window) prefix tokens
per kv-head plus the window itself. Defaults from the paper's experiments: window_size=32,
max pooling, kernel_size=7 (official code FasterDecoding/SnapKV defaults to 64 / avg / 5, as
does kvpress's SnapKVPress).
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

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name}")

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S, _ = view.keys.shape
        window = min(self.window_size, S)
        attention = observation_attention(view, window).mean(dim=1)  # [Hq, S]
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(attention[:, None, :S - window], self.kernel_size, stride=1,
                      padding=self.kernel_size // 2)[:, 0] if S > window else attention[:, :0]
        # GQA: each query head pooled, then the group's mean (official SnapKV's and kvpress's order)
        pooled = pooled.view(H, attention.shape[0] // H, S - window).mean(dim=1)                # [H, S - w]
        window_scores = torch.full((H, window), float("inf"), device=attention.device)         # the window is always kept
        return torch.cat([pooled, window_scores], dim=1)
