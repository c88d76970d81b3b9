"""tova: evict the token the current query attends to least, averaged over the layer's heads.

Paper: Transformers are Multi-State RNNs (Oren et al., 2024), arXiv 2401.06104 (Token Omission
Via Attention). A fixed-size cache per layer: whenever it holds one token more than its budget,
the token with the lowest attention from the current query, averaged over all heads of the
layer, is dropped, so every head of a layer keeps the same tokens. At the end of prefill the
last prompt token's attention picks the prompt tokens to keep. No recent window or sinks, no
options: as the official TOVACache.reduce (schwartz-lab-NLP/TOVA @ 9c7d09b).

What differs:
- Attention averaged in float32; the official code averages the model-dtype probabilities
  (near-ties). Among equal scores the oldest token goes (official: topk's order).
- kvpress's TOVAPress, its prefill half, always keeps the last prompt token, which that
  token's own attention keeps in practice.
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, observation_attention


class TOVA(DecodeEvictor):
    name = "tova"
    description = "evict the token the current query attends to least, averaged over the layer's heads (every step)"
    paper = "https://arxiv.org/abs/2401.06104"

    def scores(self, view: PrefillView) -> torch.Tensor:
        last = view.all_heads(observation_attention(view, 1)[:, 0]).mean(dim=0)   # [S] over every query head, all ranks
        return last.expand(view.keys.shape[0], -1)

    def decode_scores(self, probs, state, step):
        B, H, _, S = probs.shape
        layer_mean = step.all_heads(probs.mean(dim=2)).mean(dim=1)  # every rank's heads (RankHeads)
        return layer_mean[:, None].expand(B, H, S), state
