"""lorc: keys and values stored as latents of the truncated SVD of W_k and W_v, with ranks that
shrink with depth.

Paper: LoRC: Low-Rank Compression for LLMs KV Cache with a Progressive Compression Strategy
(Zhang et al., 2024), arXiv 2410.03111. Data-free: each layer's key and value projections are
factored by SVD (nanokv/calibrate/lowrank.py, `python -m nanokv.calibrate lorc`, seconds), and
the cache stores a token's coordinates in the top-r left singular vectors, keys before RoPE
(nanokv/cache/latent_cache.py). The rank of each layer follows the *cumulative condition number*
of the layers from it to the last: an error made in a shallow layer is amplified by every layer
after it, so shallow layers are compressed less and deep ones more (progressive compression).

Here (the paper's text on the exact rule could not be read, ≈): with kappa_l the condition number
of layer l's W_k (W_v for values), c_l = sum over j >= l of log kappa_j, scaled to s_l in [0, 1];
rank_l = r_lo + (r_hi - r_lo) * s_l, with r_hi the full rank (or lower, if the smallest rank
would fall under 16) and r_lo set so the mean rank is (1 - compression) of the full one; ranks
in steps of 16. The SVD is of each layer's whole W_k (all kv-heads jointly) unless the
calibration was made with --group.

What differs: no public code was found to compare with (searched by name and first author); the
rank schedule above is our reading of the paper's description.
"""

from __future__ import annotations

import torch

from nanokv.methods.lowrank import LowRankMethod


class LoRC(LowRankMethod):
    name = "lorc"
    description = "low-rank K/V latents from the SVD of W_k, W_v (data-free); ranks shrink with depth"
    paper = "https://arxiv.org/abs/2410.03111"
    calibration = "lorc"

    def ranks(self, artifact: dict) -> tuple[list[int], list[int]]:
        t = artifact["tensors"]
        full = t["k_basis"].shape[-1]
        return tuple([self.round_rank(float(r), full)
                      for r in progressive_ranks(t[f"{kind}_condition"], full, 1 - self.compression, self.rank_step)]
                     for kind in "kv")


def progressive_ranks(conditions: torch.Tensor, full: int, kept: float, step: int) -> torch.Tensor:
    """Per layer, a rank growing with the cumulative log condition number from that layer to the
    last, averaging `kept` of `full`, none below `step` (before rounding)."""
    cumulative = conditions.double().log().flip(0).cumsum(0).flip(0)
    spread_ = cumulative.max() - cumulative.min()
    s = (cumulative - cumulative.min()) / spread_ if spread_ > 0 else torch.zeros_like(cumulative)
    target, mean = kept * full, float(s.mean())
    if mean in (0.0, 1.0):  # every layer alike: one rank
        ranks = torch.full_like(s, target)
    else:
        low = (target - full * mean) / (1 - mean)
        high = full
        if low < step:  # the deepest layer would keep almost nothing: lower the top instead
            low = step
            high = (target - low * (1 - mean)) / mean
        ranks = low + (high - low) * s
    return ranks
