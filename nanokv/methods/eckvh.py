"""eckvh: groups of kv-heads compressed to fewer heads by the SVD of their keys and values on
calibration text.

Paper: Effectively Compress KV Heads for LLM (Yu, Yang, Li, Li, Wu, 2024), arXiv 2406.07056.
The KV caches are low rank: the keys (and values) of a group of g adjacent kv-heads, stacked into
one matrix K_g [tokens, g * D] over calibration text, keep most of their energy in few singular
directions. The paper turns MHA into GQA by keeping, for each group, the top right singular
vectors Psi [g * D, r] of K_g with r a whole number of heads, and folding them into the weights:
W_k,g Psi is the group's new key projection (r / D heads), and Psi^T goes into the query heads'
W_q (for values: W_v,g Psi, and Psi^T into W_o), so attention runs over fewer, exact heads.
Offline, `python -m nanokv.calibrate eckvh` (nanokv/calibrate/eckvh.py) computes Psi for every
layer and group from the activations; here the cache stores each token's coordinates
k_g Psi (its compressed heads) and attention reads the keys rebuilt from them, k_g Psi Psi^T
(nanokv/cache/latent_cache.py, the latent block kind that LoRC and Palu use; not a codec on the
tiered cache): the same scores as folding Psi^T into W_q, and for values the engine folds Psi^T
into the output as the paper folds it into W_o.

RoPE: a rotation does not commute with Psi, so Psi cannot be folded into W_q when the keys are
rotated. The keys are compressed before RoPE (the SVD is of the pre-RoPE keys, which calibration
reads by undoing the rotation), and the rebuilt keys are rotated at their own positions: the
reconstruct-then-rotate path Palu also takes (≈: the paper's own RoPE strategy could not be read
here; this is the maths of compressing pre-RoPE keys with RoPE kept exact).

Settings: compression=0.5 keeps half the kv-heads' numbers and compression=0.75 a quarter (the
paper's two settings: half or three-quarters of the kv-heads compressed); one rank for every
layer and group,
(1 - compression) of the group's g * D, in steps of 16 (a whole number of heads whenever
(1 - compression) g is whole, as in the paper's settings); groups of 4 adjacent kv-heads (or the
largest divisor of the kv-heads below 4) made at calibration; 32 samples of 1,024 tokens of the
prose haystack.

What differs:
- Training-free only: the paper's best results fine-tune the compressed model afterwards; not
  built here.
- Not folded into the weights: the cache stores latents and rebuilds keys for RoPE, as above; the
  attention scores are the same as the folded model's for keys without RoPE.
- Group: one calibration serves every compression, so the default group is 4 heads, and at 50%
  each group keeps 2 heads' worth of the 4-head SVD (at least as much energy as the paper's
  pairs merged to 1 head each); `--group 2` at calibration gives the paper's pairs exactly.
- Calibration text: the prose haystack (no dataset download), 32 x 1,024 tokens (≈: the paper's
  calibration set and size could not be checked here).
- No public code was found to compare with (searched by title and first author).
"""

from __future__ import annotations

from nanokv.methods.lowrank import LowRankMethod


class ECKVH(LowRankMethod):
    name = "eckvh"
    description = "kv-head groups compressed to fewer heads: the SVD of their K/V activations on calibration text"
    paper = "https://arxiv.org/abs/2406.07056"
    calibration = "eckvh"

    def ranks(self, artifact: dict) -> tuple[list[int], list[int]]:
        """Every layer's groups keep (1 - compression) of their g * D key and value directions."""
        L, _, gd = artifact["tensors"]["k_basis"].shape[:3]
        rank = self.round_rank((1 - self.compression) * gd, gd)
        return [rank] * L, [rank] * L
