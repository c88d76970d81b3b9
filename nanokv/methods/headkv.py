"""headkv: per-head budgets from a calibrated head profile, SnapKV selection within each head.

Paper: Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval
and Reasoning (Fu et al., ICLR 2025), arXiv 2410.19258; official code FYYFU/HeadKV @ 0862a09.
Heads differ in how much they fetch from the context, so the cache goes to heads by a profile of
the model made ahead of time. Two profiles, as the official `--head_choice`:

- profile=copy (the default): HeadKV-R, Retrieval Head scores (Wu et al., arXiv 2404.15574) from
  a needle copy probe: `python -m nanokv.calibrate headkv`.
- profile=reason: HeadKV-R2, the paper's headline method (and the official scripts' choice),
  retrieval-reasoning scores: `python -m nanokv.calibrate headkv_r2`. A needle gives two people's
  favorite things and ages, the question asks for the older (or younger) one's, and a head scores
  the attention its query puts, among its k most attended slots, on the answer sentence (k = the
  sentence's length), / k, summed over the answer tokens. The default stays copy so that
  `--method headkv` keeps reading the artifacts and giving the eval numbers it did before R2
  existed; R2 is one option away (headkv:profile=reason).

Allocation as the official code (headkv/snapkv_utils.py, ReasonSnapKVCluster): with B tokens a
head on average (`compression` or `budget`, as every method) and a window W, base = B - W; every
head gets base - base // beta, and a global pool of (base // beta) L H tokens is shared over all
layers and heads in proportion to the normalized scores (score / sum, raised to `temp`,
normalized again): a head keeps round(share x pool + base - base // beta) prefix tokens, plus
the window. Within each head, SnapKV selection: the last W queries' attention over the prefix,
averaged over the window, max-pooled per query head, then averaged over the kv-head's query
heads (SnapKV's order; the official cache is Hq heads wide and selects per query head); the
head's top prefix tokens and the window are kept. A capacity beyond a head's prefix is not
handed on (as in the official code); a profile of all zeros shares the pool evenly. Heads really
end with different lengths.

Defaults from the official code (run_longbench.py:217-223, 297-299): window_size=8, max pooling,
kernel_size=7, beta=1.5 (their --beta default; head_start_llama3.sh sweeps 1.005 to 10), temp=1.

Deviations:
- per kv-head: the official profiles and budgets are per query head; nanokv's cache holds
  kv-heads, so a kv-head's score is the mean over its query heads and budgets are per kv-head.
- teacher forcing: the probes feed the right answer instead of decoding greedily and keeping only
  the samples answered right (copy: ROUGE-1 recall > 50; reason: token F1 > 50), which would leave
  a small model that fails the reasoning with no sample at all.
- synthetic needles: nanokv's prose filler and drawn needles (nanokv/haystack.py), one prompt
  length, placed at a token depth, instead of Paul Graham essays and the official needles at 5
  lengths x 10 depths, each at a sentence break.
- copy only: a hit is counted per answer token (/ answer length), not per needle token.
"""

import math

import torch

from nanokv.artifacts import PROFILES
from nanokv.methods.base import CALIBRATION_FILE, PrefillView
from nanokv.methods.snapkv import SnapKV


class HeadKV(SnapKV):
    name = "headkv"
    description = ("SnapKV in each head, head budgets from a global pool by a calibrated head profile "
                   "(copy: HeadKV-R, reason: HeadKV-R2)")
    paper = "https://arxiv.org/abs/2410.19258"
    calibration = "headkv"  # profile=copy's; profile=reason reads headkv_r2's (see __init__)
    options = {**SnapKV.options,
               "profile": (str, "copy", "'copy' (HeadKV-R) or 'reason' (HeadKV-R2)",
                           lambda v: v in PROFILES.values()),
               "window_size": (int, 8, "an integer >= 1", lambda v: v >= 1),
               "beta": (float, 1.5, "a number >= 1", lambda v: v >= 1),
               "temp": (float, 1.0, "a number > 0", lambda v: v > 0),
               "calibration_file": CALIBRATION_FILE}
    head_shares: torch.Tensor | None = None  # [L, H] the normalized profile, from bind_calibration

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        # the artifact LLM loads: `python -m nanokv.calibrate headkv` (copy) or `... headkv_r2` (reason)
        self.calibration = "headkv_r2" if self.profile == "reason" else "headkv"

    def bind_calibration(self, artifact: dict):
        scores = torch.tensor(artifact["head_scores"], dtype=torch.float64, device="cpu").clamp(min=0)  # a profile
        total = float(scores.sum())
        shares = scores / total if total > 0 else torch.full_like(scores, 1 / scores.numel())
        shares = shares ** self.temp
        self.head_shares = shares / shares.sum()

    def head_capacities(self, n: int) -> torch.Tensor:
        """[L, H] prefix tokens (beyond the window) each head keeps of an n-token prompt whose
        average budget B exceeds the window."""
        if self.head_shares is None:
            raise ValueError(f"method {self.name!r} has no calibration: bind_calibration first "
                             f"(LLM does; make one with python -m nanokv.calibrate {self.calibration})")
        base = self.tokens_to_keep(n) - self.window_size
        pooled = base // self.beta                                  # each head's contribution to the pool
        pool = pooled * self.head_shares.numel()
        capacity = torch.round(self.head_shares * pool + (base - pooled))
        return capacity.clamp(0, n - self.window_size).long()

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """Exact, on average over the layer's heads (rounded up)."""
        if not self.compresses:
            return n
        keep = self.tokens_to_keep(n)
        if keep >= n or keep <= self.window_size:  # kept whole, or only the newest `keep`
            return keep
        capacity = self.head_capacities(n)[layer]
        return self.window_size + math.ceil(int(capacity.sum()) / len(capacity))

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        keep, W = self.tokens_to_keep(S), self.window_size
        if keep >= S:
            return None
        mask = torch.zeros(H, S, dtype=torch.bool, device=view.keys.device)
        if keep <= W:  # no room beyond the window: its newest tokens
            mask[:, S - keep:] = True
            return mask
        capacity = self.head_capacities(S)[view.layer].to(mask.device)        # [H]
        order = self.scores(view)[:, :S - W].argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(S - W, device=order.device).expand(H, -1))
        mask[:, :S - W] = rank < capacity[:, None]
        mask[:, S - W:] = True
        return mask
