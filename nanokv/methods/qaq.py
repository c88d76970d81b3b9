"""qaq: bits per token from its attention, keys and values apart, outliers kept in full precision.

Paper: QAQ: Quality Adaptive Quantization for LLM KV Cache (Dong et al., 2024), arXiv 2403.04643.
Keys and values are not equally sensitive to quantization: an error in a key moves every
attention weight through the softmax, an error in a value only its own weighted term, so each
gets its own bits. A token's bits follow its attention: from a target error, the grid step a
token can afford shrinks as the attention it receives grows (values: step ~ 1 / a_i; keys:
~ 1 / max_j |a_i δ_ij - a_i a_j|), so the attended tokens get more bits and the others fewer.
The attention is the newest `last_n_attentions` queries' (attention-aware look-ahead: a token
that mattered recently may matter again). The most extreme entries of each token (outliers) are
kept in full precision in a sparse list and left out of its grid. Defaults from the official code
(ClubieDong/QAQ-KVCacheQuantization @ a522809, src/experiments/grid_search.py and
src/quantizer.py): asymmetric uniform grids, outliers_ratio 0.01 (the lowest 0.5% and highest
0.5% of a token's entries: at D=64 its minimum and its maximum), last_n_attentions 5.

Here: a ranking codec (cache/codec.py). At prefill `importance` gives every prompt token the
most attention it received from the newest `last_n_attentions` prompt queries (over the query
heads of its kv-head); when a head's residual reaches `residual_length` tokens they are encoded as
one block (methods/mixed_precision.py): sorted by that attention, keys in 4 bits for the top half
of the rows and 2 bits for the rest, values in 4 bits for the top quarter and 2 for the rest
(keys more sensitive: more of them high); each row's grid per token over D, its outliers (index
uint8, value float16) apart.

What differs:
- Two bit widths per tensor with a fixed share of each block at the higher one, not a bit width
  per token solved from a target error (1 to 8 bits in the official grid search): a per-token
  width has no static layout, and the bytes here are as stored. The shares stand for the
  keys' larger need; the official code derives it from max_q_value and the targets.
- One ranking for both (a block stores its tokens in one order, and K and V rows must pair):
  the maximum attention, the values' criterion; the keys' a_i(1 - a_i) ranks tokens the same way
  while no token holds more than half of a query's attention.
- The split is per block of R = residual_length tokens; the newest (up to) R tokens stay in full
  precision (the official code keeps the newest last_n_attentions - 1 at the maximum bits).
- Tokens written at decode carry importance 0, so they take the low-bit rows after every prompt
  token of their block; a block of decode tokens alone keeps their order. The official code
  recomputes the bits from each new step's attention; here a block once encoded stays as it is.
- Quantization per kv-head and token ("head" level of the official code); scales float16.

The GPU's decode reads these blocks decoded to float32 by the twin: only KIVI's layout has a
fused kernel; a QAQ block has two code widths and a sparse outlier list per row.
"""

import torch

from nanokv.methods.base import Method, PrefillView, observation_attention
from nanokv.methods.mixed_precision import MixedPrecisionCodec, Tier, rows_of


def recent_max_attention(view: PrefillView, last_n: int) -> torch.Tensor:
    """[H, S]: the most attention each key received from the newest `last_n` prompt queries and
    the query heads of its kv-head."""
    H, S, _ = view.keys.shape
    probs = observation_attention(view, min(last_n, view.queries.shape[0]))  # [Hq, W, S]
    return probs.amax(dim=1).view(H, -1, S).amax(dim=1)


class QAQCodec(MixedPrecisionCodec):
    def __init__(self, block_size: int, k_bits: tuple[int, int], v_bits: tuple[int, int], k_share: float,
                 v_share: float, outliers_ratio: float, last_n: int):
        tiers = []
        for (high, low), share in ((k_bits, k_share), (v_bits, v_share)):
            hi = rows_of(share, block_size)
            tiers.append((Tier(high, hi, outliers_ratio=outliers_ratio),
                          Tier(low, block_size - hi, outliers_ratio=outliers_ratio)))
        super().__init__(block_size, *tiers)
        self.last_n = last_n

    def importance(self, view: PrefillView) -> torch.Tensor:
        return recent_max_attention(view, self.last_n)


class QAQ(Method):
    name = "qaq"
    description = "mixed-precision KV (bits per token from recent attention, keys and values apart, outliers in float16)"
    paper = "https://arxiv.org/abs/2403.04643"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+qaq"
    options = {
        "key_high_bits": (int, 4, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "key_low_bits": (int, 2, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "value_high_bits": (int, 4, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "value_low_bits": (int, 2, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "key_high_share": (float, 0.5, "a number in [0, 1] (the share of each block's keys at key_high_bits)",
                           lambda v: 0 <= v <= 1),
        "value_high_share": (float, 0.25, "a number in [0, 1] (the share of each block's values at value_high_bits)",
                             lambda v: 0 <= v <= 1),
        "outliers_ratio": (float, 0.01, "a number in [0, 0.5] (each token's extreme entries kept in float16)",
                           lambda v: 0 <= v <= 0.5),
        "last_n_attentions": (int, 5, "an integer >= 1 (the newest prompt queries a token's attention is read from)",
                              lambda v: v >= 1),
        "residual_length": (int, 128, "an integer >= 2 (tokens per block; the newest are in full precision)",
                            lambda v: v >= 2),
    }

    @property
    def quantization(self) -> QAQCodec:
        return QAQCodec(self.residual_length, (self.key_high_bits, self.key_low_bits),
                        (self.value_high_bits, self.value_low_bits), self.key_high_share, self.value_high_share,
                        self.outliers_ratio, self.last_n_attentions)
