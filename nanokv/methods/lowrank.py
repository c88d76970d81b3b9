"""What LoRC and Palu share: every token kept, each stored as a low-rank latent.

The cache (nanokv/cache/latent_cache.py) stores a token of a layer's head group as its
coordinates in the first r_k columns of a basis of the group's pre-RoPE keys and the first r_v of
one of its values, and attention reads keys and values rebuilt from them. The bases come from
`python -m nanokv.calibrate lorc|palu` (nanokv/calibrate/lowrank.py); the two methods differ in
the bases and in how many columns each layer keeps (`ranks`), which is where `compression` goes:
compression=r keeps (1 - r) of the K and V numbers of a token over the model (the fraction
removed, as elsewhere). No token is evicted, so a budget does not apply.
"""

from __future__ import annotations

import torch

from nanokv.methods.base import CALIBRATION_FILE, Method


class LowRankMethod(Method):
    stores_latents = True
    options = {"calibration_file": CALIBRATION_FILE}
    rank_step = 16  # ranks are multiples of this (and of the cache's chunk, so no slot is padding)

    def check_budget(self):
        if self.budget is not None:
            raise ValueError(f"{self.name} keeps every token in fewer numbers: give compression (the fraction of "
                             f"the K and V numbers removed), not budget")

    def bind_calibration(self, artifact: dict):
        from nanokv.cache.latent_cache import LatentLayer

        t = artifact["tensors"]
        k_ranks, v_ranks = self.ranks(artifact)
        self.group = artifact["group"]
        self.latent_layers = [LatentLayer(t["k_basis"][l][..., :rk], t["v_basis"][l][..., :rv], t["k_bias"][l],
                                          t["v_bias"][l]) for l, (rk, rv) in enumerate(zip(k_ranks, v_ranks))]

    def ranks(self, artifact: dict) -> tuple[list[int], list[int]]:
        """Columns each layer's groups keep of their key and value bases."""
        raise NotImplementedError

    def round_rank(self, rank: float, full: int) -> int:
        step = min(self.rank_step, full)
        return int(min(full, max(step, round(rank / step) * step)))


    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n


def spread(weights: torch.Tensor, total: float, full: int) -> torch.Tensor:
    """Integer shares of `total` proportional to `weights`, none over `full`: the floors of the
    proportional shares, then one more each, smallest fractional part first, to units below
    `full`, until the total is met (Palu's fisher_uniform allocation, as its rank_search.py does)."""
    share = total * weights.double() / weights.double().sum()
    ranks = share.floor().clamp(max=full).long()
    left = int(round(total)) - int(ranks.sum())
    order = torch.argsort(share - share.floor()).tolist()
    while left > 0 and bool((ranks < full).any()):
        for u in order:
            if left > 0 and ranks[u] < full:
                ranks[u] += 1
                left -= 1
    return ranks
