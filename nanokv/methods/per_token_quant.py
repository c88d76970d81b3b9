"""int8, int4: the per-token quantization baselines KIVI is measured against.

Keys and values both quantized per token, asymmetric (scale + zero point) over groups of
`group_size` channels: the "fake per-token quantization" rows of KIVI's Table 1 (arXiv
2402.02750; its repository has no code for them) and the group-wise scheme of FlexGen (arXiv
2303.06865; FMInference/FlexGen @ 19753bc, flexgen/compression.py). KIVI's finding is that
per-token keys break down at 2 bits, where per-channel keys (`kivi`) do not; at 8 and 4 bits
both hold up. Defaults: group_size=32 (KIVI's group), residual_length=32 (one group).

What differs:
- FlexGen's 4-bit cache groups 64 channels (`--method-arg group_size=64` does that); 32 here.
- Tokens are quantized a block at a time, so up to residual_length - 1 of the newest wait in
  full precision; FlexGen quantizes each token right after its own step.
- int8 has no FlexGen counterpart in its stored cache (4 bits only); it is the same scheme at
  8 bits. FlexGen stores 1 / scale; here the scale (the codes differ only by float16 rounding).
"""

from nanokv.methods.kivi import KIVI, grouped_residual


class Int8(KIVI):
    name = "int8"
    description = "8-bit per-token KV quantization (a baseline for kivi)"
    paper = "https://arxiv.org/abs/2402.02750"
    keys_per_channel = False
    fixed_bits = 8
    options = {
        **grouped_residual(group_size=32, residual_length=32),
    }

    @property
    def bits(self) -> int:
        return self.fixed_bits


class Int4(Int8):
    name = "int4"
    description = "4-bit per-token KV quantization (a baseline for kivi)"
    fixed_bits = 4
