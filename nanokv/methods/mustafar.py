"""mustafar: unstructured magnitude sparsity of keys and values, stored as a bitmap and the kept numbers.

Paper: Mustafar: Promoting Unstructured Sparsity for KV Cache Pruning in LLM Inference (Joo et al.,
2025), arXiv 2505.22913. Each cached token's key and value vectors are pruned element by element:
per token, along the head dimension, the entries of smallest magnitude are set to zero (the
paper finds per-token magnitude pruning of both keys and values the best of its variants: the
official code's Kt_Mag_Vt_Mag). The pruned vectors are stored compressed, a bitmap of which
entries survive plus the surviving numbers in float16, and decode attention reads that format
(the paper's SpMV kernel). The newest `residual_length` tokens stay dense until there are enough
to compress together.

Here each cold block of R = residual_length tokens of one kv-head stores, for K and for V:
  {k,v}_bitmap  uint8 [R, D / 8]   bit c of a token's row set: channel c kept (lowest bit first)
  {k,v}_values  float16 [R, keep]  the kept entries of each token, in channel order
with keep = D - floor(sparsity * D) the same for every token, so a block's layout is static and
its bytes are what is stored. At D = 64, sparsity 0.5: 8 + 32 * 2 = 72 bytes per token for K and
72 for V (144), against 256 for K and V in float16. Decode: a kept entry's place among its row's
set bits (a running count of the bitmap) picks its number; every other entry is 0.

Defaults from the official code (dhjoo98/mustafar @ a8fad80, utils/process_args.py and
models/llama_mustafar_Kt_Mag_Vt_Mag.py): k_sparsity = v_sparsity = 0.5, residual_length = 128
(its LongBench runs in pred/ also use 0.7; the paper reports up to 70%).

What differs:
- Kept per token: the D - floor(s D) largest magnitudes, exactly (ties broken by topk). The
  official code keeps every |x| >= the floor(s D)-th smallest magnitude (kthvalue), which is one
  entry more than that (and more on ties): at D = 128, s = 0.7 it keeps 40, here 39.
- Layout: one bitmap row per token for K and V, the numbers padded to a fixed count. The
  official kernel (kernel/compression.py) tiles 64 elements per 64-bit bitmap (keys tiled along
  tokens within a channel, for its SpMV over K^T; values along channels), bits from the highest
  down, and the numbers of each tile padded to a multiple of 8 in a variable-length buffer.
- The residual is flushed R tokens at a time (as KIVI's here: 0 to R - 1 newest tokens dense),
  where the official code prunes in groups as it goes; decode reads the compressed blocks
  through the twin (decoded to float32, then the same softmax as the dense residual), not a
  sparse kernel (see README: only KIVI's layout has a fused one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import pack, unpack
from nanokv.methods.base import Method

VALUE_DTYPE = torch.float16  # the official compressed format keeps the numbers in float16


def kept_entries(head_dim: int, sparsity: float) -> int:
    """Entries a token keeps of head_dim at `sparsity` (the fraction pruned, rounded down)."""
    return head_dim - math.floor(sparsity * head_dim)


def sparsify(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (bitmap uint8 [..., D / 8], values [..., keep] in channel order): each row's
    `keep` entries of largest magnitude."""
    top = x.float().abs().topk(keep, dim=-1).indices.sort(dim=-1).values  # channel order
    mask = torch.zeros(x.shape, dtype=torch.uint8, device=x.device).scatter_(-1, top, 1)
    return pack(mask, 1), x.gather(-1, top).to(VALUE_DTYPE)


def densify(bitmap: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The inverse of `sparsify` -> float32 [..., D]. Any bitmap reads back finite: an entry whose
    bit is clear is 0 (the pool's zero block has no bits set at all)."""
    mask = unpack(bitmap, 1).bool()
    rank = (mask.cumsum(-1) - 1).clamp_(0, values.shape[-1] - 1)  # the kept entry's place in its row
    return values.float().gather(-1, rank).masked_fill_(~mask, 0.0)


@dataclass(frozen=True)
class SparseCodec(Codec):
    """Mustafar's bitmap-compressed sparse K and V (see the module docstring)."""
    k_sparsity: float
    v_sparsity: float
    block_size: int = 128

    def field_shapes(self, head_dim: int):
        if head_dim % 8:
            raise ValueError(f"head_dim={head_dim} must be a multiple of 8 for mustafar's bitmaps")
        R = self.block_size
        bitmap = (torch.uint8, (R, head_dim // 8))
        return {"k_bitmap": bitmap, "k_values": (VALUE_DTYPE, (R, kept_entries(head_dim, self.k_sparsity))),
                "v_bitmap": bitmap, "v_values": (VALUE_DTYPE, (R, kept_entries(head_dim, self.v_sparsity)))}

    def encode(self, k, v, layer, importance):
        D = k.shape[-1]
        k_bitmap, k_values = sparsify(k, kept_entries(D, self.k_sparsity))
        v_bitmap, v_values = sparsify(v, kept_entries(D, self.v_sparsity))
        return {"k_bitmap": k_bitmap, "k_values": k_values, "v_bitmap": v_bitmap, "v_values": v_values}

    def decode(self, fields, layer):
        return densify(fields["k_bitmap"], fields["k_values"]), densify(fields["v_bitmap"], fields["v_values"])


def sparsity_option(name):
    return (float, 0.5, "a fraction in [0, 1) of each token's entries to prune", lambda v: 0 <= v < 1)


class Mustafar(Method):
    name = "mustafar"
    description = "per-token magnitude pruning of K and V entries, stored as bitmap + float16 values"
    paper = "https://arxiv.org/abs/2505.22913"
    quantizes = True
    compression_hint = "it keeps every token, with fewer entries; to evict too, combine methods, e.g. snapkv+mustafar"
    options = {
        "k_sparsity": sparsity_option("k"),
        "v_sparsity": sparsity_option("v"),
        "residual_length": (int, 128, "a positive integer", lambda v: v > 0),
    }

    @property
    def quantization(self) -> SparseCodec:
        return SparseCodec(self.k_sparsity, self.v_sparsity, self.residual_length)
