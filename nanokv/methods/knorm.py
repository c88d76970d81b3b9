"""knorm: keep the keys with the lowest L2 norm.

Paper: A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al.,
EMNLP 2024), arXiv 2406.11430. Keys with a low norm draw high attention, so per (layer, head)
keep the tokens whose key norm is lowest. Attention-free: no scores to compute. The paper
leaves the first two layers uncompressed (official code alessiodevoto/l2compress,
`skip_layers=[0, 1]`): option `skip_layers` (default 2); kvpress's KnormPress compresses every
layer (`skip_layers=0`).
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
