"""knorm: keep the keys with the lowest L2 norm.

Paper: A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al.,
EMNLP 2024), arXiv 2406.11430. Keys with a low norm draw high attention, so per (layer, head)
keep the tokens whose key norm is lowest. Attention-free: no scores to compute. The first two
layers are left whole, as in the official l2_compress usage (alessiodevoto/l2compress @
f93d6ca, README and eval_lm_quick.py `skip_layers=[0, 1]`): option `skip_layers` (default 2);
kvpress's KnormPress compresses every layer (`skip_layers=0`). ceil((1 - r) n) kept, as there.

What differs:
- No `prune_after` threshold: l2compress leaves caches shorter than it (e.g. 1000) whole; here
  any prompt over the budget is compressed.
- Compresses once, after prefill (as its README quickstart and kvpress); its LM evaluation
  compresses again after every token.
- Kept tokens stay in position order (l2compress stores them in norm order; attention is the
  same) and norms are float32 (near-ties).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView


class KNorm(PrefillSelector):
    name = "knorm"
    description = "keep the tokens whose keys have the lowest L2 norm"
    paper = "https://arxiv.org/abs/2406.11430"
    options = {"skip_layers": (int, 2, "an integer >= 0 (first layers left whole)", lambda v: v >= 0)}

    def applies_to(self, layer: int) -> bool:
        return layer >= self.skip_layers

    def scores(self, view: PrefillView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
