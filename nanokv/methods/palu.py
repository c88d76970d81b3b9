"""palu: keys and values stored as latents of a whitened SVD on calibration text, ranks set by
Fisher information.

Paper: Palu: Compressing KV-Cache with Low-Rank Projection (Chang et al., 2024), arXiv 2407.21118.
Offline, `python -m nanokv.calibrate palu` runs calibration text through the model and, for each
group of 4 consecutive kv-heads (group-head low-rank decomposition, G-LRD), takes the SVD of W_k
and W_v whitened by the inputs' second moments (SVD-LLM): its top singular vectors are the
directions that carry most of the keys and values actually seen (nanokv/calibrate/lowrank.py).
The cache stores a token's coordinates in them, keys before RoPE (nanokv/cache/latent_cache.py).

Ranks (as the official code's default search: shadowpa0327/Palu @ bb22666, compress.py,
fisher_uniform in palu/rank_search.py): each layer's W_k and W_v is one unit, weighted by its
Fisher information (the mean over its weights of the RMS of the LM loss gradient); the kept
rank, (1 - compression) of all units' full ranks together, is shared out in proportion to it,
the remainder one at a time; a unit's rank is split evenly over its groups and rounded to a
multiple of 32. Defaults: group 4 (compress.py's head_group_size; or the largest divisor of the
kv-heads below it), 32 samples of 1,024 tokens of the prose haystack.

What differs:
- Calibration text: the official code reads 256 x 2,048 WikiText-2 tokens for whitening and
  2,048 x 1,024 for Fisher; here the prose haystack (no dataset download), 32 x 1,024.
- Fisher from the next-token loss; the official rank_search.py passes labels already shifted
  to a model that shifts them again (a two-tokens-ahead loss), so its ranks can differ by a
  step of 32.
- Not built: Palu's optional Hadamard transform and low-bit quantization of the latents.
"""

from __future__ import annotations

import torch

from nanokv.methods.lowrank import LowRankMethod, spread


class Palu(LowRankMethod):
    name = "palu"
    description = "low-rank K/V latents from a whitened SVD on calibration text; Fisher-weighted ranks"
    paper = "https://arxiv.org/abs/2407.21118"
    calibration = "palu"
    rank_step = 32  # rank_search.py rounds to multiples of 32

    def ranks(self, artifact: dict) -> tuple[list[int], list[int]]:
        t = artifact["tensors"]
        L, G, gd = t["k_basis"].shape[:3]
        fisher = torch.cat([t["k_fisher"], t["v_fisher"]])                       # [2L] units: W_k, then W_v
        unit = spread(fisher, (1 - self.compression) * G * gd * 2 * L, G * gd)  # each unit's rank
        per_group = [self.round_rank(int(r) // G, gd) for r in unit.tolist()]
        return per_group[:L], per_group[L:]
