"""minikv: layer-discriminative heavy-hitter eviction at prefill, then 2-bit KIVI quantization.

Paper: MiniKV: Pushing the Limits of LLM Inference via 2-Bit Layer-Discriminative KV Cache
(Sharma et al., 2024), arXiv 2411.18077. Eviction and quantization compose when the selection is
made once, at prefill, and then kept fixed: per (layer, kv-head), the prompt keeps its `recent`
newest tokens and the heavy hitters of the rest, the tokens whose attention summed over every
prompt query (H2O's accumulated score) is highest. Attention funnels with depth, so the heavy
share falls linearly with depth (its "pyramid" strategy): with an average heavy share h over L
layers, layer l keeps h f_l, f_0 = 2 - 1/delta down to f_{L-1} = 1/delta, delta = 7. What is
kept is then quantized KIVI's way at 2 bits (keys per channel, values per token), the newest
tokens in full precision; nothing is evicted during decode.

In nanokv's budget terms: the request's per-head budget B (compression or budget) splits into
recent = floor(B recent_ratio) and an average heavy share B - recent; layer l keeps
recent + floor((B - recent) f_l) (all of the prompt when that reaches it).

Defaults from the official code (Supercomputing-System-AI-Lab/MiniKV @ 257f08a, README and
minikv/monkeypatch/minikv_utils.py PyramidH2OSelectionMechanism, cache_impl.QuantizedCache):
heavy_ratio = recent_ratio = 0.25 of the prompt (here recent_ratio = 0.5 of the budget, the same
split), delta = 7, quant_bits = 2, group_size = 16, residual_length = 128.

What differs:
- GQA: the accumulated attention of the query heads sharing a kv-head is averaged (the official
  selection indexes kv-heads with a per-query-head mask, which only works without GQA).
- Budgets: a share of the request's budget (nanokv's compression / budget), where the official
  takes heavy_ratio and recent_ratio of the prompt directly; a layer's heavy count is rounded down
  from the budget's heavy share, not from n heavy_ratio f_l.
- Quantization: the tiered cache's KIVI codec (residual flushed R = residual_length tokens at a
  time, keys and values together). The official cache quantizes the whole kept prompt at prefill
  but its last (n mod group_size) tokens, and then every residual_length decode tokens.
- eviction_strategy=uniform (the official README's Llama-3 runs) gives every layer B.
- The official's selective flash-attention kernel (attention and column sums in one pass) is the
  engine's prefill attention with column sums.
"""

import torch

from nanokv.cache.quant_pool import QuantSpec
from nanokv.methods.base import PrefillSelector, PrefillView, top_per_head
from nanokv.methods.kivi import check_grouped_residual, grouped_residual

DELTA = 7  # the official pyramid's ratio of the first layer's heavy share to the last's, (2 delta - 1)


def pyramid_factor(layer: int, num_layers: int) -> float:
    """f_l: layer l's heavy share over the average, from 2 - 1/delta down to 1/delta (mean 1)."""
    if num_layers == 1:
        return 1.0
    first, last = 2 - 1 / DELTA, 1 / DELTA
    return first + (last - first) * layer / (num_layers - 1)


class MiniKV(PrefillSelector):
    name = "minikv"
    description = "heavy hitters + recent window at prefill, heavy share falling with depth, then 2-bit KIVI"
    paper = "https://arxiv.org/abs/2411.18077"
    needs_column_sums = True
    options = {
        "recent_ratio": (float, 0.5, "a fraction in [0, 1] of the budget kept as the newest tokens",
                         lambda v: 0 <= v <= 1),
        "eviction_strategy": (str, "pyramid", "'pyramid' or 'uniform'", lambda v: v in ("pyramid", "uniform")),
        "bits": (int, 2, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        **grouped_residual(group_size=16, residual_length=128),
    }

    def check_budget(self):
        check_grouped_residual(self)

    @property
    def quantization(self) -> QuantSpec:
        return QuantSpec(self.bits, True, self.group_size, self.residual_length)

    def split(self, n: int, layer: int, num_layers: int) -> tuple[int, int]:
        """(heavy, recent) tokens a head of `layer` keeps of an n-token prompt."""
        budget = self.tokens_to_keep(n)
        recent = int(budget * self.recent_ratio)
        heavy = budget - recent
        if self.eviction_strategy == "pyramid":
            heavy = int(heavy * pyramid_factor(layer, num_layers))
        return min(heavy, n - recent), recent

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        return sum(self.split(n, layer, num_layers))

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        S = view.keys.shape[1]
        heavy, recent = self.split(S, view.layer, view.num_layers)
        if heavy + recent >= S:
            return None
        scores = view.column_sums.clone()
        scores[:, S - recent:] = float("inf")  # the recent window, always kept
        return top_per_head(scores, heavy + recent)
