"""zipcache: salient tokens in 4 bits, the rest in 2, saliency from normalized attention of probe queries.

Paper: ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification
(He et al., NeurIPS 2024), arXiv 2405.14256. A token's saliency is its normalized attention: the
attention it receives summed over the queries that can see it, divided by how many do (the plain
column sum favours early tokens, which every query sees). Computing it from every query needs the
full attention matrix, so it is estimated from probe queries: the newest 5% of the prompt's and
a random 5% of the rest. The most salient share of tokens is quantized at 4 bits, the rest at 2.
Keys are quantized per channel (each channel's grid over the tokens of its precision); values
channel-separably token-wise: each channel divided by sqrt(max |v_c|), then a grid per token,
then the channel scale multiplied back. Defaults from the official code (ThisisBillhe/ZipCache
@ 196dc2c, zipcache_generation_demo.py: keys "mixed_channelwiseQ", values
"channel_separate_mixed_tokenwiseQ", 4 / 2 bits, unimportant ratio 0.4, streaming_gap 100;
CompressUtils/compress_function.py for the two quantizers) and the paper (probes, §4.3).

Here: a ranking codec (cache/codec.py). At prefill `importance` gives every prompt token its
normalized attention from the probes; when a head's residual reaches `residual_length` tokens
they are encoded as one block (methods/mixed_precision.py): sorted by saliency, the top
round(0.6 R) rows at 4 bits, the other rows at 2.

What differs:
- The split is per block of R = residual_length tokens (a fixed share of every block, so the
  layout is static and the bytes are as stored), not over the whole sequence; the per-channel key
  grids and the value channel scales are per block and tier, not over every token of the tier.
- Tokens written at decode carry importance 0, so in the block they share with the prompt's last
  tokens they take the 2-bit rows after every prompt token; a block of decode tokens alone keeps
  their order, the oldest round(0.6 R) at 4 bits. The official code re-ranks and re-compresses the
  whole cache every 100 decode steps with new probes; here a block once encoded stays as it is
  (its tokens are not kept in full precision to re-encode). R = 100 follows that gap: the newest
  (up to) 100 tokens are in full precision, as between two of its re-compressions.
- The random probes are drawn from a hash of (layer, position), not a generator, so a prompt
  gets the same probes whatever the batch. Saliency is averaged over the query heads of a
  kv-head (the official code works per attention head, its models without GQA).
- Quantization is per kv-head (the official code flattens all heads of a token into one row).
- Scales and zero points are float16 (the official code keeps the model's dtype).

The GPU's decode reads these blocks decoded to float32 by the twin: only KIVI's layout has a
fused kernel; a mixed-precision block has two code widths and per-tier grids.
"""

import math

import torch

from nanokv.methods.base import Method, PrefillView, hashed_uniform
from nanokv.methods.mixed_precision import MixedPrecisionCodec, Tier, rows_of

PROBE_SEED = 0x21BCA5E  # the random probes' hash seed: any fixed number


def probe_queries(T: int, recent: float, random: float, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the probe queries among T: the newest ceil(recent T) and ceil(random T)
    of the others, those whose hashed draw is lowest (positions [T]: each query's)."""
    n_recent = min(T, math.ceil(recent * T))
    older = T - n_recent
    n_random = min(older, math.ceil(random * T))
    drawn = hashed_uniform(PROBE_SEED, layer, 0, positions[:older]).topk(n_random, largest=False).indices
    return torch.cat([drawn.sort().values, torch.arange(older, T, device=positions.device)])


def normalized_attention(view: PrefillView, probes: torch.Tensor) -> torch.Tensor:
    """[H, S]: each key's attention from the probe queries, summed, over the number of probes that
    see it (causal by position), averaged over the query heads of each kv-head."""
    H, S, D = view.keys.shape
    T, Hq = view.queries.shape[:2]
    q = view.queries[probes].float()                                    # [P, Hq, D]
    q_pos = view.positions[S - T + probes]                              # [P]
    keys = view.keys.float().repeat_interleave(Hq // H, dim=0)          # [Hq, S, D]
    logits = torch.einsum("phd,hsd->hps", q, keys) / math.sqrt(D)
    sees = view.positions[None, :] <= q_pos[:, None]                    # [P, S]
    probs = logits.masked_fill(~sees, float("-inf")).softmax(dim=-1)
    score = probs.sum(dim=1) / sees.sum(dim=0).clamp(min=1)             # [Hq, S]
    return score.view(H, Hq // H, S).mean(dim=1)


class ZipCacheCodec(MixedPrecisionCodec):
    def __init__(self, block_size: int, high_share: float, high_bits: int, low_bits: int,
                 probe_recent: float, probe_random: float):
        hi = rows_of(high_share, block_size)
        super().__init__(block_size,
                         (Tier(high_bits, hi, "channel"), Tier(low_bits, block_size - hi, "channel")),
                         (Tier(high_bits, hi, separable=True), Tier(low_bits, block_size - hi, separable=True)))
        self.probe_recent, self.probe_random = probe_recent, probe_random

    def importance(self, view: PrefillView) -> torch.Tensor:
        T = view.queries.shape[0]
        S = view.keys.shape[1]
        probes = probe_queries(T, self.probe_recent, self.probe_random, view.layer, view.positions[S - T:])
        return normalized_attention(view, probes)


BITS = (2, 4, 8)


class ZipCache(Method):
    name = "zipcache"
    description = "mixed-precision KV (salient tokens by probe-estimated normalized attention in 4 bits, the rest in 2)"
    paper = "https://arxiv.org/abs/2405.14256"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+zipcache"
    options = {
        "high_bits": (int, 4, "2, 4 or 8 (the salient tokens' bits)", lambda v: v in BITS),
        "low_bits": (int, 2, "2, 4 or 8 (the other tokens' bits)", lambda v: v in BITS),
        "salient_share": (float, 0.6, "a number in [0, 1] (the share of each block's tokens at high_bits)",
                          lambda v: 0 <= v <= 1),
        "probe_recent": (float, 0.05, "a number in (0, 1] (the newest prompt queries used as probes)",
                         lambda v: 0 < v <= 1),
        "probe_random": (float, 0.05, "a number in [0, 1] (random prompt queries used as probes)",
                         lambda v: 0 <= v <= 1),
        "residual_length": (int, 100, "an integer >= 2 (tokens per block; the newest are in full precision)",
                            lambda v: v >= 2),
    }

    @property
    def quantization(self) -> ZipCacheCodec:
        return ZipCacheCodec(self.residual_length, self.salient_share, self.high_bits, self.low_bits,
                             self.probe_recent, self.probe_random)
