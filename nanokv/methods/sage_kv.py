"""sage_kv: sinks, a recent window, and per head what the last prompt token attends to.

Paper: LLMs Know What to Drop: Self-Attention Guided KV Cache Eviction for Efficient
Long-Context Inference (Wang et al., 2025), arXiv 2503.08879 (SAGE-KV). After prefill the
cache splits into sinks (the first tokens), a recent window ending with the last token, and
the tokens between; the last prompt token's query attends over those and each head keeps its
own top-k of them, one time. Per layer: the last query's softmax attention over the prompt,
averaged over the query heads that share a kv-head (GQA); keep `sink_tokens` + the top
(budget - sinks - recent) of the middle per kv-head + `recent_tokens`. A budget below sinks +
recent keeps sinks then the newest tokens (StreamingLLM). As kvpress's presses do, it acts once
after prefill and keeps every generated token.

Defaults: sink_tokens=4 (StreamingLLM's sinks), recent_tokens=32 (SnapKV's observation window).
Paper only: no public code found (code index, GitHub repo names sage-kv / sagekv, issues and
pages for SAGE-KV / arXiv 2503.08879); the paper's own sink and window sizes are not restated.
What differs:
- recent_tokens includes the last prompt token; the paper keeps it as a segment of its own, in
  addition to the recent window (one token more).
- the paper's decoding slides the recent window to hold the cache at its size; here every
  generated token is kept.
- GQA: the group's mean attention (our choice; the paper is silent).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention


class SageKV(PrefillSelector):
    name = "sage_kv"
    description = "sinks + recent window + each head's top-k by the last prompt token's attention (one shot)"
    paper = "https://arxiv.org/abs/2503.08879"
    options = {"sink_tokens": (int, 4, "an integer >= 0", lambda v: v >= 0),
               "recent_tokens": (int, 32, "an integer >= 1 (the last prompt token is among them)", lambda v: v >= 1)}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens + self.recent_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens + recent_tokens = "
                             f"{self.sink_tokens + self.recent_tokens} for sage_kv")

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S = view.keys.shape[:2]
        last = observation_attention(view, 1)[:, 0]                     # [Hq, S], each row sums to 1
        scores = last.view(H, -1, S).mean(dim=1)                         # [H, S] GQA: mean over the group
        recent = min(self.recent_tokens, S)
        # above any attention (<= 1): the recent window, newest first, then the sinks above all
        scores[:, S - recent:] = 2 + torch.arange(S - recent, S, device=scores.device) / S
        scores[:, :self.sink_tokens] = float("inf")
        return scores
