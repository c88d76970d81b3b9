"""think: the older tokens' keys keep only the channels the last queries weigh most.

Paper: ThinK: Thinner Key Cache by Query-Driven Pruning (Xu et al., 2024), arXiv 2407.21018.
Key channels differ in how much they contribute to q . k, and a few carry most of it. After
prefill, per layer and kv-head, each channel c scores

    score_c = mean over the last 32 queries of q_c^2  x  mean over the held keys of k_c^2

(post-RoPE; the query heads of a GQA group averaged). The int(channel_ratio x D) lowest go:
every held token but the newest `recent` keeps only the other channels (nanokv/cache/
pruned_cache.py, slim blocks that really hold fewer bytes), and at decode the query is cut to a
head's kept channels for those tokens. The recent window and every generated token keep all
channels, as in the official code. Values are whole.

Composes with token eviction as the paper evaluates it: compression or budget first keeps
SnapKV's choice (this class is SnapKV with its options), whose kept keys are then scored and
pruned; compression=0 prunes channels alone. KV bytes: tokens x (1 - channel_ratio / 2) of full.

Defaults from the official run_longbench.py (SalesforceAIResearch/ThinK @ d200577):
channel_ratio=0.4, recent=32, observation window 32 (SnapKV window 32, max pooling, kernel 7).
The kept channels equal kvpress ThinKPress's (@ 8bb29b9) with recent=0.
What differs:
- GQA: one token set and one channel set per kv-head from the group's mean q^2 (kvpress
  ThinKPress); the official code scores each query head over keys repeated per head (Hq / H
  copies of the cache). MHA models are the same.
- the recent 32 keep every channel, as in the official code; kvpress prunes every prompt key.
- the SnapKV part averages in float32; the official code sums the window's attention in the
  model's dtype (rank ties only).
"""

import torch

from nanokv.methods.base import PrefillView
from nanokv.methods.snapkv import SnapKV

OBSERVED_QUERIES = 32  # the official pruner scores with the prompt's last 32 queries


class ThinK(SnapKV):
    name = "think"
    description = "older tokens' keys keep the channels the last queries weigh most (with snapkv's eviction)"
    paper = "https://arxiv.org/abs/2407.21018"
    options = {
        **SnapKV.options,
        "channel_ratio": (float, 0.4, "a number in (0, 1) (the share of key channels pruned)",
                          lambda v: 0 < v < 1),
        "recent": (int, 32, "an integer >= 0 (newest tokens that keep every channel)", lambda v: v >= 0),
    }
    prunes_key_channels = True

    @property
    def compresses(self) -> bool:
        return True  # channels are pruned even when no token is evicted

    def kept_channels(self, head_dim: int) -> int:
        return head_dim - int(head_dim * self.channel_ratio)

    def key_channels(self, view: PrefillView, keep: torch.Tensor | None) -> torch.Tensor:
        """[H, kD] the channels each kv-head keeps, in increasing order, scored over the keys that
        `keep` [H, S] keeps (all, when None)."""
        H, S, D = view.keys.shape
        q = view.queries[-OBSERVED_QUERIES:].float().pow(2).mean(0)             # [Hq, D]
        q = q.view(H, -1, D).mean(1)                                            # GQA: the group's mean
        k2 = view.keys.float().pow(2)
        if keep is None:
            k = k2.mean(1)
        else:
            k = (k2 * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        top = (q * k).topk(self.kept_channels(D), dim=-1).indices
        return top.sort(dim=-1).values
