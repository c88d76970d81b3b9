"""random: keep a uniformly random subset of tokens per (layer, kv-head).

The floor every method must beat (kvpress's RandomPress, NVIDIA/kvpress @ 8bb29b9). Option
`seed` (default 0) makes a run repeatable.

What differs: each layer draws its own subset (a per-layer seed, float32 draws on the CPU);
kvpress's seeded RandomPress makes a fresh generator on every call, so every layer keeps the
same positions, and draws in the keys' dtype. ceil((1 - r) n) kept; kvpress int(n (1 - r)).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView


class RandomMethod(PrefillSelector):
    name = "random"
    description = "keep a random subset of tokens per head (the baseline to beat)"
    paper = ""
    options = {"seed": (int, 0, "an integer", lambda v: True)}

    def scores(self, view: PrefillView) -> torch.Tensor:
        # drawn on the CPU, so a seed keeps the same tokens on every device
        # every head of the layer drawn (tensor parallelism: this rank keeps its own), so the draw is tp=1's
        H, S = view.keys.shape[:2]
        g = torch.Generator().manual_seed(self.seed * 100003 + view.layer)
        return view.own_heads(torch.rand((view.total_heads(H), S), generator=g, device="cpu")).to(view.keys.device)
