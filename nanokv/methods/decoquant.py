"""decoquant: a two-core matrix product operator per block; the large core quantized, the small one kept.

Paper: Unlocking Data-free Low-bit Quantization with Matrix Decomposition for KV Cache
Compression (Liu et al., ACL 2024), arXiv 2405.12591. A cached matrix X [T, C] (tokens x
channels) is decomposed as a matrix product operator of two local tensors: the channels split
as C = C1 x C2 (channel c = c1 * C2 + c2), X is read as M [(t, c1), c2] = X[t, c1 * C2 + c2]
and M = U S V^T (exact: the bond dimension is C2, nothing truncated). The singular values are
split evenly between the cores (the MPO's canonical gauge): the large tensor G = U S^(1/2)
[T, C1, C2] and the small tensor W = S^(1/2) V^T [C2, C2]. Outliers, which sit in a few channels,
land in the small tensor; the large one has a narrower range and is quantized to b bits,
symmetric, one absmax scale per token: codes round(G / s) in [-(2^(b-1) - 1), 2^(b-1) - 1],
s = max |G[t]| / (2^(b-1) - 1). W stays in float16. Read back as X = reshape(G W).

Defaults from the official code (lpyhdzx/DecoQuant_code @ 7184cba): the small tensor is 16 wide
(icl/models/modeling_llama_transformers_ours_new.py, KV_SHAPE = ([1, 1], [128, 16]): MPO input
shape [T, 1], output shape [C / 16, 16], truncate_num 100000, so the bond is the full 16); the
large tensor quantized per token by absmax (icl/models/fake_quant.py,
quantize_activation_per_token_absmax_test), the small one cast to float16; bits 2, 4 or 8
(README, Tables 1 and 3). Default here: 4 bits (2-bit absmax has three levels) and blocks of
128 tokens (KIVI's residual).

What differs:
- Each block is R = residual_length tokens of ONE kv-head (X [R, head_dim], C1 = head_dim / 16),
  so each block has its own small tensor and each token one scale per head. The official code
  decomposes a whole prompt's cache of all heads at once (X [T, num_heads * head_dim]), with one
  scale per token over all heads.
- Tokens are compressed R at a time as they age; the newest 0 to R - 1 wait in full precision.
  The official code compresses the prompt (its in-context demonstrations) once and keeps what
  follows in full precision.
- The split is the plain balanced one, G = U S^(1/2) and W = S^(1/2) V^T; the official gauge
  (left / right canonical forms, then p and q) reaches the same cores in exact arithmetic, but
  adds 1e-6 to the singular values it inverts. Scales are rounded to float16 before the codes are
  taken; the official scale floor of 1e-5 is kept.
- Codes are stored offset by 2^(b-1) - 1 (unsigned, packed along the channels).

The cold blocks, the residual and attention over both are the cache's (nanokv/cache/quant_cache.py). On CUDA too
the twin decodes the blocks: a token is its codes times the block's small core, a matrix product
the fused kernels (KIVI's affine codes) do not make (docs/architecture.md, "Which codecs the fused
kernels read").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import pack, unpack
from nanokv.methods.base import Method

FLOAT16 = torch.float16  # the small tensor and the scales are stored in it
SCALE_FLOOR = 1e-5       # official: scales.clamp_(min=1e-5) before dividing by the largest code


def decompose(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, R, D] float32 -> the large tensor [N, R, D] (as [N, R * D / width, width] rows of the
    bond) and the small one [N, width, width]: x[t, c1 * width + c2] = sum_k large[t, c1, k] small[k, c2]."""
    N, R, D = x.shape
    u, s, vt = torch.linalg.svd(x.reshape(N, R * D // width, width), full_matrices=False)
    root = s.sqrt()
    return (u * root[..., None, :]).reshape(N, R, D), root[..., :, None] * vt


@dataclass(frozen=True)
class DecoQuantCodec(Codec):
    bits: int = 4
    block_size: int = 128  # tokens decomposed together (one small tensor each)
    width: int = 16        # the small tensor's side: channels per row of the large one

    @property
    def top(self) -> int:
        return 2 ** (self.bits - 1) - 1   # the largest code of the symmetric grid

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        R, D, w = self.block_size, head_dim, self.width
        if D % w:
            raise ValueError(f"head_dim={D} is not a multiple of the small tensor's width={w}")
        fields = {}
        for x in "kv":
            fields |= {f"{x}_codes": (torch.uint8, (R, D * self.bits // 8)), f"{x}_scale": (FLOAT16, (R,)),
                       f"{x}_small": (FLOAT16, (w, w))}
        return fields

    def encode(self, k, v, layer, importance):
        fields = {}
        for x, tensor in (("k", k), ("v", v)):
            large, small = decompose(tensor.float(), self.width)
            scale = (large.abs().amax(-1).clamp(min=SCALE_FLOOR) / self.top).to(FLOAT16)
            codes = (large / scale.float()[..., None]).round().clamp(-self.top, self.top) + self.top
            fields |= {f"{x}_codes": pack(codes.to(torch.uint8), self.bits), f"{x}_scale": scale,
                       f"{x}_small": small.to(FLOAT16)}
        return fields

    def decode(self, fields, layer):
        out = []
        for x in "kv":
            codes = unpack(fields[f"{x}_codes"], self.bits).float() - self.top
            large = codes * fields[f"{x}_scale"].float()[..., None]          # [..., R, D]
            rows = large.unflatten(-1, (-1, self.width))                      # [..., R, C1, width]
            out.append((rows @ fields[f"{x}_small"].float()[..., None, :, :]).flatten(-2))
        return out[0], out[1]


class DecoQuant(Method):
    name = "decoquant"
    description = "quantized KV after a matrix-product-operator split (small tensor kept, large one quantized)"
    paper = "https://arxiv.org/abs/2405.12591"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+decoquant"
    options = {
        "bits": (int, 4, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "residual_length": (int, 128, "a positive multiple of 16 (tokens per decomposed block)",
                            lambda v: v > 0 and v % 16 == 0),
        "width": (int, 16, "a power of two in [2, 64] (the small tensor's side)",
                  lambda v: 2 <= v <= 64 and v & (v - 1) == 0),
    }

    @property
    def quantization(self) -> DecoQuantCodec:
        return DecoQuantCodec(self.bits, self.residual_length, self.width)
