"""leankv: keys in more bits than values, and each head keeps only the tokens its attention needs.

Paper: Unifying KV Cache Compression for Large Language Models with LeanKV (Zhang et al., 2024),
arXiv 2412.03131. Three observations, three mechanisms:
- Hetero-KV: a key error moves every attention weight (through the softmax), a value error only
  its own token's share of the output, so keys get more bits than values (K8V4, K4V2).
- Per-head dynamic sparsity: heads differ in how concentrated their attention is, and so in how
  many tokens they need. Each head keeps the most significant tokens until they cover a share
  (`attention_mass`) of its attention; a concentrated head keeps few, a diffuse one many.
- An on-GPU memory manager turns the resulting uneven per-head lengths into freed memory (unified
  paging of high/low precision and pruned entries, free lists compacted in parallel on the GPU).

Here, at the end of each layer's prefill: the significance of a token to a kv-head is the
attention the prompt's last `window_size` queries give it (averaged over the window and the
group's query heads, a distribution over the prompt). The window is always kept; then the other
tokens, most significant first, until the kept ones hold `attention_mass` of the head's attention,
and never more than the request's budget per head (the window itself included) (compression / budget: the ceiling the
scheduler plans memory with). What is kept is stored in LeanKV's hetero precision, KIVI's way
(keys per channel over groups of tokens, values per token over groups of channels, float16 scales
and zero points), the newest tokens in full precision until a block of `residual_length` fills:
  k_codes uint8 [R, D k_bits / 8], k_scale, k_zero float16 [R / G, D]
  v_codes uint8 [R, D v_bits / 8], v_scale, v_zero float16 [R, D / G]
At D = 64, K8V4, G = 32: 64 + 32 code bytes + 8 (key scale and zero, 2 x 2 bytes x 64 channels
per 32 tokens) + 8 (value scale and zero, 2 x 2 bytes x 2 groups) = 112 bytes per token against
256 for K and V in float16; K4V2: 32 + 16 + 8 + 8 = 64.

Memory management: nanokv's pool already does the part that turns sparsity into memory: every
(layer, kv-head) has its own block table and length, compaction gathers a head's kept tokens to
the front of its blocks and returns its tail blocks to the free list, and quantized and
full-precision blocks are rows of one byte size in one pool (cache/quant_pool.py, as LeanKV's
unified paging). The free list and block tables live on the host, not on the GPU, and are not
compacted in parallel there (LeanKV's on-GPU manager).

Defaults (≈: the paper's text was not reachable from this session, and there is no official
code): k_bits=8, v_bits=4 (the paper's near-lossless hetero setting; K4V2 is its aggressive one),
attention_mass=0.95, window_size=32 (SnapKV's observation window), group_size=32 and
residual_length=128 (KIVI's).

What differs:
- Significance from the prompt's observation window at prefill (SnapKV's), and pruning only at
  prefill: LeanKV prunes and re-ranks during decode too, which quantized cold blocks here cannot
  follow (their tokens are not compacted).
- Per-token mixed precision (LeanKV's unified compression: significant tokens in the higher
  pair, the next ones in the lower, the rest pruned) is not here: one pair for every kept token.
- A head's count is capped by the request's budget (nanokv plans a request's memory from it);
  with a budget that does not bind, the threshold alone decides.
- The codes are KIVI's at two widths, which the fused decode kernels (Triton on CUDA, C++ on CPU)
  read in place, dequantizing as they go; LeanKV's own kernels and page manager are not ported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import BITS, dequantize_tokens, pack, quantize_keys, quantize_values
from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention
from nanokv.methods.kivi import grouped_residual

SCALE_DTYPE = torch.float16  # KIVI's scales and zero points


@dataclass(frozen=True)
class HeteroCodec(Codec):
    """KIVI's layout with keys in k_bits and values in v_bits (see the module docstring)."""
    k_bits: int
    v_bits: int
    group_size: int = 32
    block_size: int = 128
    packed = True            # KIVI's codes at two widths: the fused kernels read them
    keys_per_channel = True

    def packed_bits(self, layer):
        return self.k_bits, self.v_bits

    def __post_init__(self):
        for name, bits in (("k_bits", self.k_bits), ("v_bits", self.v_bits)):
            if bits not in BITS:
                raise ValueError(f"{name} must be one of {BITS}, got {bits}")
        if self.block_size % self.group_size:
            raise ValueError(f"residual_length={self.block_size} must be a multiple of group_size={self.group_size}")

    def field_shapes(self, head_dim: int):
        if head_dim % self.group_size:
            raise ValueError(f"head_dim={head_dim} is not a multiple of group_size={self.group_size}")
        R, G, D = self.block_size, self.group_size, head_dim
        per_channel, per_token = (SCALE_DTYPE, (R // G, D)), (SCALE_DTYPE, (R, D // G))
        return {"k_codes": (torch.uint8, (R, D * self.k_bits // 8)), "k_scale": per_channel, "k_zero": per_channel,
                "v_codes": (torch.uint8, (R, D * self.v_bits // 8)), "v_scale": per_token, "v_zero": per_token}

    def encode(self, k, v, layer, importance):
        k_codes, k_scale, k_zero = quantize_keys(k, self.k_bits, self.group_size, SCALE_DTYPE)
        v_codes, v_scale, v_zero = quantize_values(v, self.v_bits, self.group_size, SCALE_DTYPE)
        return {"k_codes": pack(k_codes, self.k_bits), "k_scale": k_scale.squeeze(-2), "k_zero": k_zero.squeeze(-2),
                "v_codes": pack(v_codes, self.v_bits), "v_scale": v_scale.squeeze(-1), "v_zero": v_zero.squeeze(-1)}

    def decode(self, fields, layer):
        f, G = fields, self.group_size
        return (dequantize_tokens(f["k_codes"], f["k_scale"], f["k_zero"], self.k_bits, G, True),
                dequantize_tokens(f["v_codes"], f["v_scale"], f["v_zero"], self.v_bits, G, False))


def bits_option(default, what):
    return (int, default, f"2, 4 or 8 ({what})", lambda v: v in BITS)


class LeanKV(PrefillSelector):
    name = "leankv"
    description = "per-head dynamic sparsity (attention-mass threshold) + keys in more bits than values"
    paper = "https://arxiv.org/abs/2412.03131"
    options = {
        "attention_mass": (float, 0.95, "a fraction in (0, 1] of each head's attention its kept tokens cover",
                           lambda v: 0 < v <= 1),
        "window_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
        "k_bits": bits_option(8, "the key bits, at least v_bits"),
        "v_bits": bits_option(4, "the value bits"),
        **grouped_residual(group_size=32, residual_length=128),
    }

    def check_budget(self):
        if self.k_bits < self.v_bits:
            raise ValueError(f"option k_bits={self.k_bits} of method {self.name!r} must be at least "
                             f"v_bits={self.v_bits} (hetero-KV: keys in more bits than values)")
        HeteroCodec(self.k_bits, self.v_bits, self.group_size, self.residual_length)  # its own checks

    @property
    def quantization(self) -> HeteroCodec:
        return HeteroCodec(self.k_bits, self.v_bits, self.group_size, self.residual_length)

    def significance(self, view: PrefillView) -> torch.Tensor:
        """[H, S]: each token's share of the window queries' attention, per kv-head (sums to 1)."""
        H, S, _ = view.keys.shape
        attention = observation_attention(view, min(self.window_size, S)).mean(dim=1)  # [Hq, S]
        return attention.view(H, -1, S).mean(dim=1)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S, _ = view.keys.shape
        budget = min(S, self.layer_budget(S, view.layer, view.num_layers))
        window = min(self.window_size, S)
        significance = self.significance(view)
        order_by = significance.clone()
        # the window first, newest first (all above any share), so a budget under it keeps the newest
        order_by[:, S - window:] = 2 + torch.arange(window, device=order_by.device, dtype=order_by.dtype)
        order = order_by.argsort(dim=-1, descending=True)
        mass = significance.gather(-1, order).cumsum(dim=-1)      # kept mass after each token
        # a head keeps its tokens up to and including the first that brings it to attention_mass
        needed = (mass < self.attention_mass * mass[:, -1:]).sum(dim=-1) + 1
        count = needed.clamp(min=min(window, budget), max=budget)
        if bool((count >= S).all()):
            return None
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(S, device=order.device).expand(H, S))
        return rank < count[:, None]
