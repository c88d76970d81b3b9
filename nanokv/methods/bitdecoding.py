"""bitdecoding: KIVI-style low-bit K and V in BitDecoding's tensor-core packing, and its plain-torch decode.

Paper: BitDecoding: Unlocking Tensor Cores for Long-Context LLMs Decoding with Low-Bit KV Cache
(Du et al., 2025), arXiv 2503.18773. The numbers are KIVI's ("k-channel" mode: keys quantized per
channel over groups of tokens, values per token over groups of channels, asymmetric, a scale and a
zero point per group); what BitDecoding adds is where the codes sit. A decode kernel that feeds
the tensor cores dequantizes the codes in registers into the operand fragments of an
m16n8k16 MMA, so the codes are packed the way those fragments are spread over a warp's lanes
("layout induction"): a 16-bit word holds 16 / bits codes (4 at 4 bits, 8 at 2 bits) that one
lane needs for consecutive MMA tiles along N, i.e. elements 32 apart (the N extent of the 4
warps x 8 columns of one tiled-MMA step), not neighbours, the first in the lowest bits. The
residual (the newest tokens) stays in float16 until a pack block fills: 32 x 16 / bits tokens
(128 at 4 bits, 256 at 2 bits, the official kBlockN_pack).

A cold block of R = 32 x 16 / bits tokens of one kv-head (P = 16 / bits codes a word):
  k_words   uint8 [R / P, 2 D]  little-endian 16-bit words; word (t0, c), t0 < 32, holds the codes
                                of channel c at tokens t0 + 32 j, j < P (bits j x bits up)
  k_params  float16 [R / G, 2 D] per group of G tokens: the D channels' scales, then their zeros
  v_words   uint8 [R, 2 D / P]  word (t, n0), n0 < D / P, holds token t's codes of channels
                                n0 + (D / P) j, j < P
  v_params  float16 [D / Gv, 2 R] per group of Gv = min(G, D) channels, per run of 128 tokens:
                                the run's scales, then its zeros
At D = 64, 4 bits, G = 128 (Gv = 64), per token: K 32 code bytes + 2 (256 bytes of params per 128
tokens), V 32 + 4 (one group: 2 x 2 bytes a token), 70 bytes against 256 for K and V in float16;
2 bits, 256-token blocks: K 16 + 2, V 16 + 4, 38 bytes.
The numbers are those of KIVI's codec (quant_pool.QuantSpec) at the same bits and groups: only
where each code and scale sits differs (tests/test_methods_wave5_c.py checks the decodes equal).

Defaults from the official code (DD-DuDa/BitDecoding @ e829b5a, csrc/bit_decode/src/
test_single_packdecode.cu and include/kernel_traits.h, qpack.h, flash_fwd_kernel.h): quant_mode
k-channel, num_bits 4, group_size 128, pack blocks (kBlockN_pack) of 128 tokens at 4 bits and 256
at 2 bits.

What differs:
- Decode reads the packed words through the twin (unpacked and dequantized to float32 in plain
  torch, then the tiered cache's softmax), not a tensor-core kernel: that kernel belongs with the
  GPU-kernels issue's quantized decode; only KIVI's layout has a fused kernel here.
- The official kernel is written for head_dim 128 and whole warps; the rules above are its
  4-bit key and value layout there (stride 32 = D / P), taken as the rule for other head_dims
  and for 2-bit values (stride D / P), which the official kernel does not cover.
- Words are stored as byte pairs (uint8 fields; the bytes of the little-endian uint16 words).
  The params follow the official order (flash_fwd_kernel.h writes half2s of neighbouring
  channels or tokens: per key group 64 half2 scales then 64 zeros at D = 128; per value group
  and run of 128 tokens, 64 half2 scales then 64 zeros), read here as float16 runs; the official
  params tensor keeps a row per (group, head) of the whole sequence, here one block's.
- The value group is capped at the head: Gv = min(group_size, head_dim) (at D = 128 and the
  default 128, the official whole-head group).
- Codes are rounded against the float16-rounded scale, as KIVI's codec here (kernels/quant.py);
  the official kernel rounds against its float32 inverse scale (a code can differ by one at a
  rounding tie).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import dequantize, quantize
from nanokv.methods.base import Method

LANE_SPAN = 32       # elements between the codes of one word: 4 warps x the MMA's 8 columns along N
PARAM_RUN = 128      # value params are written per 128 tokens: their scales, then their zeros
SCALE_DTYPE = torch.float16


def codes_per_word(bits: int) -> int:
    return 16 // bits


def to_words(codes: torch.Tensor, bits: int, stride: int) -> torch.Tensor:
    """codes uint8 [..., n] (n a multiple of stride x P) -> little-endian 16-bit words as bytes
    [..., 2 n / P]: in each run of stride x P codes, word i holds codes i + stride j, j < P."""
    P = codes_per_word(bits)
    runs = codes.to(torch.int32).unflatten(-1, (-1, P, stride))             # [..., runs, j, i]
    shifts = (torch.arange(P, device=codes.device, dtype=torch.int32) * bits)[:, None]
    words = (runs << shifts).sum(-2).flatten(-2)                          # [..., n / P], < 2^16
    return torch.stack([words & 0xFF, words >> 8], -1).flatten(-2).to(torch.uint8)


def from_words(data: torch.Tensor, bits: int, stride: int) -> torch.Tensor:
    """The inverse of `to_words` -> codes uint8 [..., n]."""
    P = codes_per_word(bits)
    pairs = data.to(torch.int32).unflatten(-1, (-1, 2))
    words = (pairs[..., 0] | (pairs[..., 1] << 8)).unflatten(-1, (-1, stride))  # [..., runs, i]
    shifts = (torch.arange(P, device=data.device, dtype=torch.int32) * bits)[:, None]
    codes = (words[..., None, :] >> shifts) & ((1 << bits) - 1)           # [..., runs, j, i]
    return codes.flatten(-3).to(torch.uint8)


@dataclass(frozen=True)
class BitDecodingCodec(Codec):
    """KIVI's numbers in BitDecoding's packing (see the module docstring)."""
    bits: int
    group_size: int = 128

    def __post_init__(self):
        if self.bits not in (2, 4):
            raise ValueError(f"bits must be 2 or 4 (BitDecoding's kernels), got {self.bits}")
        if self.block_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the pack block of {self.block_size} tokens")

    @property
    def block_size(self) -> int:
        return LANE_SPAN * codes_per_word(self.bits)

    def value_group(self, head_dim: int) -> int:
        return min(self.group_size, head_dim)

    def field_shapes(self, head_dim: int):
        R, D, P, G = self.block_size, head_dim, codes_per_word(self.bits), self.group_size
        if D % P or D % self.value_group(D):
            raise ValueError(f"head_dim={D} must be a multiple of {P} (codes per word) and of the value "
                             f"group {self.value_group(D)}")
        return {"k_words": (torch.uint8, (R // P, 2 * D)), "k_params": (SCALE_DTYPE, (R // G, 2 * D)),
                "v_words": (torch.uint8, (R, 2 * D // P)), "v_params": (SCALE_DTYPE, (D // self.value_group(D), 2 * R))}

    def encode(self, k, v, layer, importance):
        D, P, G, Gv = k.shape[-1], codes_per_word(self.bits), self.group_size, self.value_group(k.shape[-1])
        k_codes, k_scale, k_zero = quantize(k, self.bits, G, dim=-2, scale_dtype=SCALE_DTYPE)  # [N, R/G, 1, D]
        v_codes, v_scale, v_zero = quantize(v, self.bits, Gv, dim=-1, scale_dtype=SCALE_DTYPE)  # [N, R, D/Gv, 1]
        # keys: words along tokens, so the tokens axis goes last to pack, then back
        k_words = to_words(k_codes.transpose(-1, -2), self.bits, LANE_SPAN)  # [N, D, 2 R / P]
        k_words = k_words.unflatten(-1, (-1, 2)).transpose(-2, -3).flatten(-2)  # [N, R / P, 2 D]
        return {"k_words": k_words,
                "k_params": torch.cat([k_scale.squeeze(-2), k_zero.squeeze(-2)], -1),
                "v_words": to_words(v_codes, self.bits, D // P),
                "v_params": torch.stack([v_scale.squeeze(-1).transpose(-1, -2).unflatten(-1, (-1, PARAM_RUN)),
                                         v_zero.squeeze(-1).transpose(-1, -2).unflatten(-1, (-1, PARAM_RUN))],
                                        -2).flatten(-3)}  # [N, D / Gv, runs x (scales, zeros)]

    def decode(self, fields, layer):
        words_k, words_v = fields["k_words"], fields["v_words"]
        D = words_k.shape[-1] // 2
        R, P = self.block_size, codes_per_word(self.bits)
        k_words = words_k.unflatten(-1, (D, 2)).transpose(-2, -3).flatten(-2)  # [..., D, 2 R / P]
        k_codes = from_words(k_words, self.bits, LANE_SPAN).transpose(-1, -2)  # [..., R, D]
        k_scale, k_zero = fields["k_params"].float().unflatten(-1, (2, D)).unbind(-2)  # [..., R / G, D]
        v_codes = from_words(words_v, self.bits, D // P)                     # [..., R, D]
        runs = fields["v_params"].float().unflatten(-1, (R // PARAM_RUN, 2, PARAM_RUN))
        v_scale, v_zero = (part.flatten(-2) for part in runs.unbind(-2))  # [..., D / Gv, R]
        return (dequantize(k_codes, k_scale.unsqueeze(-2), k_zero.unsqueeze(-2), self.group_size, -2),
                dequantize(v_codes, v_scale.transpose(-1, -2).unsqueeze(-1), v_zero.transpose(-1, -2).unsqueeze(-1),
                           self.value_group(D), -1))


class BitDecoding(Method):
    name = "bitdecoding"
    description = "KIVI-style 4/2-bit K and V in BitDecoding's tensor-core packing (decoded by the twin)"
    paper = "https://arxiv.org/abs/2503.18773"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+bitdecoding"
    options = {
        "bits": (int, 4, "2 or 4", lambda v: v in (2, 4)),
        "group_size": (int, 128, "a power of two >= 8 dividing the pack block (128 tokens at 4 bits, 256 at 2)",
                       lambda v: v >= 8 and v & (v - 1) == 0),
    }

    def check_budget(self):
        self.quantization  # the codec's own checks (a group larger than the pack block)

    @property
    def quantization(self) -> BitDecodingCodec:
        return BitDecodingCodec(self.bits, self.group_size)
