"""kivi: keys quantized per channel, values per token, the newest tokens in full precision.

Paper: KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024),
arXiv 2402.02750. Keys have a few channels with large magnitudes, so each key channel gets its
own grid over a group of `group_size` tokens; values, whose error matters per token in the
attention-weighted sum, get one grid per token over `group_size` channels. Asymmetric: each
group stores a scale and a zero point (its min). The newest `residual_length` tokens stay in
full precision until there are enough to quantize as a group. Defaults from the paper and the
official code (jy-yuan/KIVI @ 876b4d2, docs/long_bench.md): 2 bits (4 also reported),
group_size=32, residual_length=128.

What differs:
- Values are flushed with their keys, R = residual_length at a time (a head's block holds
  both): 0 to R - 1 of the newest values are in full precision between steps. Official KIVI
  keeps the newest R values in full precision always (a sliding window, one token at a time).
- One bit width for K and V (official: k_bits and v_bits; its reported settings use equal ones).
- A constant group reads back as its value (official: scale 0, a division by zero); scales and
  zero points are float16, dequantization runs in float32.

The quantized blocks, the residual and attention over both are the cache's: see
nanokv/cache/quant_cache.py (how the residual is flushed) and nanokv/kernels/quant_decode.py.
"""

from nanokv.cache.quant_pool import QuantSpec
from nanokv.methods.base import Method


def grouped_residual(group_size: int, residual_length: int) -> dict:
    """The options of a codec in KIVI's layout that groups tokens (keys per channel over
    group_size tokens) and flushes its residual residual_length tokens at a time, with defaults."""
    return {"group_size": (int, group_size, "a power of two >= 8", lambda v: v >= 8 and v & (v - 1) == 0),
            "residual_length": (int, residual_length, "a positive multiple of group_size", lambda v: v > 0)}


def check_grouped_residual(method: Method):
    if method.residual_length % method.group_size:
        raise ValueError(f"option residual_length={method.residual_length} of method {method.name!r} must be a "
                         f"multiple of group_size={method.group_size}")


class KIVI(Method):
    name = "kivi"
    description = "quantized KV (keys per channel, values per token, newest tokens in full precision)"
    paper = "https://arxiv.org/abs/2402.02750"
    keys_per_channel = True
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+kivi"
    options = {
        "bits": (int, 2, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        **grouped_residual(group_size=32, residual_length=128),
    }

    def check_budget(self):
        check_grouped_residual(self)

    @property
    def quantization(self) -> QuantSpec:
        return QuantSpec(self.bits, self.keys_per_channel, self.group_size, self.residual_length)
