"""mikv: the tokens H2O would evict are kept in low bits instead, the important ones in float16.

Paper: No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision
Quantization (Yang et al., 2024), arXiv 2402.18096. An eviction policy (H2O: the attention each
token has accumulated) splits the cache into an important set and the set it would evict. The
important set stays in high precision (FP16, or INT8); the would-be-evicted set is kept, quantized
per token (asymmetric round-to-nearest, 2 to 4 bits), because losing it entirely is what makes
eviction hallucinate or miss context. Keys have outlier channels that such low-bit per-token
grids cannot hold, so the low-precision keys are first balanced per channel: k_c * b_c with
b_c = sqrt(max|q_c| / max|k_c|) (queries divided by b_c, so q.k is unchanged) (paper §3.2).
No official code was published; defaults from the paper: float16 for the important set, 2 bits
for the rest, 20% important (≈: its experiments sweep the important share; 20% is H2O's
default budget, heavy hitters and recent tokens 10% each).

Here: a ranking codec (cache/codec.py). At prefill `importance` gives every prompt token its
H2O score (attention summed over the prompt's queries, averaged over the query heads of its
kv-head); when a head's residual reaches `residual_length` tokens they are encoded as one block
(methods/mixed_precision.py): sorted by that score, the top round(0.2 R) rows in float16, the
others at 2 bits per token, keys balanced per channel first.

What differs:
- The balancer has no query half: a codec sees a block's keys, not the queries, so
  b_c = 1 / sqrt(max |k_c|) over the block's low-precision keys (stored, float16 [D]), which is
  the paper's b_c for queries of equal range in every channel. Applied to the key grid and
  undone at decode, not folded into the query.
- The split is per block of R = residual_length tokens (a fixed share of each block, so the
  layout is static), not over the whole cache. H2O's recent window is the residual: the newest
  (up to) R tokens stay in full precision.
- Tokens written at decode carry importance 0, so they take the low-bit rows after every prompt
  token of their block; a block of decode tokens alone keeps their order, the oldest 20% in
  float16. The paper's H2O keeps accumulating attention at decode and moves tokens between the
  sets; here a block once encoded stays as it is.
- One grid per token over its D channels (the paper's group is not stated for every setting);
  scales and zero points float16.

The GPU's decode reads these blocks decoded to float32 by the twin: only KIVI's layout has a
fused kernel; a mixed-precision block has float16 rows beside packed ones.
"""

import torch

from nanokv.methods.base import Method, PrefillView, prompt_logits
from nanokv.methods.mixed_precision import MixedPrecisionCodec, Tier, rows_of


def accumulated_attention(view: PrefillView) -> torch.Tensor:
    """[H, S]: H2O's score, each key's attention summed over the prompt's queries (causal), averaged
    over the query heads of each kv-head."""
    H, S, _ = view.keys.shape
    Hq = view.queries.shape[1]
    total = torch.zeros(Hq, S, dtype=torch.float32, device=view.keys.device)
    for _, logits in prompt_logits(view):
        total += logits.softmax(dim=-1).sum(dim=1)
    return total.view(H, Hq // H, S).mean(dim=1)


class MiKVCodec(MixedPrecisionCodec):
    def __init__(self, block_size: int, important_share: float, high_bits: int, low_bits: int):
        hi = rows_of(important_share, block_size)
        super().__init__(block_size,
                         (Tier(high_bits, hi), Tier(low_bits, block_size - hi, separable=True)),
                         (Tier(high_bits, hi), Tier(low_bits, block_size - hi)))

    def importance(self, view: PrefillView) -> torch.Tensor:
        return accumulated_attention(view)


class MiKV(Method):
    name = "mikv"
    description = "mixed-precision KV (H2O's important tokens in float16, the tokens it would evict in 2 bits)"
    paper = "https://arxiv.org/abs/2402.18096"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+mikv"
    options = {
        "high_bits": (int, 16, "8 or 16 (the important tokens: int8, or float16 as is)", lambda v: v in (8, 16)),
        "low_bits": (int, 2, "2, 4 or 8 (the other tokens' bits)", lambda v: v in (2, 4, 8)),
        "important_share": (float, 0.2, "a number in [0, 1] (the share of each block's tokens at high_bits)",
                            lambda v: 0 <= v <= 1),
        "residual_length": (int, 128, "an integer >= 2 (tokens per block; the newest are in full precision)",
                            lambda v: v >= 2),
    }

    @property
    def quantization(self) -> MiKVCodec:
        return MiKVCodec(self.residual_length, self.important_share, self.high_bits, self.low_bits)
