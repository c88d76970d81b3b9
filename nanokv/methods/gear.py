"""gear: low-bit quantization, plus a low-rank approximation of its error, plus sparse outliers.

Paper: GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of
LLM (Kang et al., 2024), arXiv 2403.05527. Each cached matrix X (one head's K or V, a buffer
of tokens at a time) is stored as X ~ D + S + L:
- S, the sparse outliers: the largest and the smallest entries of every row (keys: of each
  channel over the tokens; values: of each token over the channels) are kept exactly, in
  float16, with their positions, and replaced by the row's mean before quantizing, so they no
  longer stretch the quantization grid;
- D, the backbone: KIVI's uniform asymmetric quantization of what remains (keys per channel over
  groups of tokens, values per token over groups of channels; 2 or 4 bits);
- L = A B, the low-rank error: the rank-r approximation of X - D - S by power iteration
  (`iterations` rounds from a fixed random start, orthonormalized in the last round), A [R, r]
  and B [r, D] in float16.
Read back as D + S (outliers overwrite their codes) + A B.

Defaults from the official code (opengear-project/GEAR @ efe0bfe): 2 bits, group size 64 and
a streaming buffer of 64 full-precision tokens compressed when full (cuda_supported_gear/test.py:
group_size=64, residual=64, quantize_bit=2, rank=rankv=2, loop=3; the GEAR rows of
GenerationBench/GenerationTest/run_template_llama-3-8b.sh: --group_size 64 --loop 3 --rank 2
--rankv 2 --left 0.02 --streaming_gap 64); outliers: 2% ("left"), half from the top, half from
the bottom of each row (GEARLM/Simulated/compress_function.py, gears_channelQ / gears_tokenQ).

What differs:
- One rank for every block: rank 2, what the official code uses for each 64-token buffer it
  compresses during decode. Its simulated runs give the prompt, compressed as one matrix of the
  whole prompt, rank 4 (--prefillrank 4); here the prompt is compressed in the same 64-token
  blocks as decode, so each block gets the per-buffer rank.
- Outliers are counted per row: max(1, round(outliers / 2 * row length)) from the top and as many
  from the bottom, so a block has a fixed number (index and value lists of fixed length). At the
  default 2% and 64-token blocks a key channel keeps its largest and smallest entry (2 of 64,
  3.1%); a 64-channel value token the same. The official code counts per flattened token of all
  heads (num_heads * head_dim entries), and its key count, taken from that same formula, is
  applied along the tokens.
- The low-rank start is a fixed seeded random matrix (official: torch.rand, a new one each call),
  so a run is reproducible; the error it approximates is against the stored backbone (float16
  scales and outliers), so A B corrects what decode will read.
- 4 bits uses the same KIVI layout (group 64); GEAR's 4-bit "KCVT" backbone (keys per channel over
  the whole sequence, values per token over all heads) does not fit fixed blocks of one head.
- Keys and values share one bit width, one rank and one outlier share (official: rank and rankv).
- The newest 0 to 63 tokens wait in full precision for their block, as in the official
  streaming buffer; the prompt's last partial block waits too (official: compressed at once).

The cold blocks, the residual and attention over both are the cache's (nanokv/cache/quant_cache.py). On CUDA too
the twin decodes the blocks: the fused kernels read KIVI's codes alone, not the low-rank product
and the outlier lists (docs/architecture.md, "Which codecs the fused kernels read").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import dequantize_tokens, quantize_tokens
from nanokv.methods.base import Method
from nanokv.methods.kivi import check_grouped_residual

FLOAT16 = torch.float16  # scales, zero points, low-rank factors and outlier values are stored in it
INDEX = torch.int16      # an outlier's position in its block, token * head_dim + channel
START_SEED = 0           # the power iteration's fixed random start


def outliers_per_row(share: float, row_length: int) -> int:
    """How many entries of a row are kept from the top (and as many from the bottom)."""
    return max(1, round(share / 2 * row_length)) if share > 0 else 0


def split_outliers(x: torch.Tensor, per_row: int, rows_are_channels: bool):
    """x [N, R, D] float32 -> (x with every row's `per_row` largest and smallest entries set to the
    row's mean, their flat indices [N, 2 * per_row * rows] and values). Rows are channels (keys:
    each channel over the block's tokens) or tokens (values)."""
    R, D = x.shape[-2:]
    rows = x.transpose(-1, -2) if rows_are_channels else x        # [N, rows, row length]
    top = rows.topk(per_row, dim=-1).indices
    bottom = rows.topk(per_row, dim=-1, largest=False).indices
    picked = torch.cat([top, bottom], -1)                           # [N, rows, 2 * per_row]
    values = rows.gather(-1, picked)
    # the mean of the whole row, outliers included (official: the mean before they are removed)
    cleaned = rows.scatter(-1, picked, rows.mean(-1, keepdim=True).expand_as(picked))
    row = torch.arange(rows.shape[-2], device=x.device).unsqueeze(-1)
    flat = picked * D + row if rows_are_channels else row * D + picked   # token * D + channel
    cleaned = cleaned.transpose(-1, -2) if rows_are_channels else cleaned
    return cleaned.contiguous(), flat.flatten(-2), values.flatten(-2)


def power_iteration(error: torch.Tensor, rank: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """error [N, R, D] -> A [N, R, rank] (orthonormal columns), B [N, rank, D] with A B the
    projection of error onto the span power iteration finds (official: headwise_lrap)."""
    generator = torch.Generator(device="cpu").manual_seed(START_SEED)
    p = torch.rand(error.shape[-1], rank, generator=generator, device="cpu").to(error.device)
    p = p.expand(error.shape[0], -1, -1)
    for i in range(iterations):
        last = i == iterations - 1
        if last:  # only the last round orthonormalizes, as the official code does
            p = torch.linalg.qr(p).Q
        q = error @ p
        if last:
            q = torch.linalg.qr(q).Q
        p = error.transpose(-1, -2) @ q
    return q, p.transpose(-1, -2)


@dataclass(frozen=True)
class GEARCodec(Codec):
    bits: int = 2
    group_size: int = 64
    block_size: int = 64    # the streaming buffer: tokens compressed together
    rank: int = 2
    outliers: float = 0.02  # share of a row's entries kept exactly (half top, half bottom)
    iterations: int = 3

    def outlier_counts(self, head_dim: int) -> tuple[int, int]:
        """Outliers per block of K (rows are channels of block_size tokens) and of V (rows are
        tokens of head_dim channels)."""
        R, D = self.block_size, head_dim
        return 2 * outliers_per_row(self.outliers, R) * D, 2 * outliers_per_row(self.outliers, D) * R

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        R, G, D, r = self.block_size, self.group_size, head_dim, self.rank
        if D % G:
            raise ValueError(f"head_dim={D} is not a multiple of group_size={G}")
        if r > min(R, D):
            raise ValueError(f"rank={r} must be at most the block's tokens ({R}) and head_dim ({D})")
        if R * D > 2 ** 15:
            raise ValueError(f"a block of {R} tokens x head_dim={D} has more entries than int16 outlier "
                             f"indices address (32768); use a smaller residual_length")
        codes = (torch.uint8, (R, D * self.bits // 8))
        fields = {"k_codes": codes, "k_scale": (FLOAT16, (R // G, D)), "k_zero": (FLOAT16, (R // G, D)),
                  "v_codes": codes, "v_scale": (FLOAT16, (R, D // G)), "v_zero": (FLOAT16, (R, D // G))}
        for x, count in zip("kv", self.outlier_counts(D)):
            if r:
                fields |= {f"{x}_a": (FLOAT16, (R, r)), f"{x}_b": (FLOAT16, (r, D))}
            if count:
                fields |= {f"{x}_out_index": (INDEX, (count,)), f"{x}_out_value": (FLOAT16, (count,))}
        return fields

    def encode(self, k, v, layer, importance):
        k, v = k.float(), v.float()
        D = k.shape[-1]
        per_row = (outliers_per_row(self.outliers, self.block_size), outliers_per_row(self.outliers, D))
        cleaned, fields = {}, {}
        for x, tensor, count in (("k", k, per_row[0]), ("v", v, per_row[1])):
            cleaned[x] = tensor
            if count:
                cleaned[x], index, value = split_outliers(tensor, count, rows_are_channels=x == "k")
                fields |= {f"{x}_out_index": index.to(INDEX), f"{x}_out_value": value.to(FLOAT16)}
        fields |= quantize_tokens(cleaned["k"], cleaned["v"], self.bits, self.group_size, True, FLOAT16)
        if self.rank:
            # the error left by what decode will read (stored scales, float16 outliers), not by
            # the float32 quantizer: the low-rank term corrects the stored backbone
            stored_k, stored_v = self.backbone(fields)
            for x, tensor, stored in (("k", k, stored_k), ("v", v, stored_v)):
                a, b = power_iteration(tensor - stored, self.rank, self.iterations)
                fields |= {f"{x}_a": a.to(FLOAT16), f"{x}_b": b.to(FLOAT16)}
        return fields

    def backbone(self, fields: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """D + S: the dequantized codes with the outliers written over theirs, float32 [..., R, D]."""
        G, out = self.group_size, []
        for x, per_channel in (("k", True), ("v", False)):
            f = {name[2:]: value for name, value in fields.items() if name.startswith(x + "_")}
            dense = dequantize_tokens(f["codes"], f["scale"], f["zero"], self.bits, G, per_channel)
            if "out_index" in f:
                flat = dense.flatten(-2)
                flat.scatter_(-1, f["out_index"].long(), f["out_value"].float())
                dense = flat.unflatten(-1, dense.shape[-2:])
            out.append(dense)
        return out[0], out[1]

    def decode(self, fields, layer):
        k, v = self.backbone(fields)
        if self.rank:
            k = k + fields["k_a"].float() @ fields["k_b"].float()
            v = v + fields["v_a"].float() @ fields["v_b"].float()
        return k, v


class GEAR(Method):
    name = "gear"
    description = "quantized KV plus a low-rank approximation of the error and sparse outliers"
    paper = "https://arxiv.org/abs/2403.05527"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+gear"
    options = {
        "bits": (int, 2, "2 or 4", lambda v: v in (2, 4)),
        "group_size": (int, 64, "a power of two >= 8", lambda v: v >= 8 and v & (v - 1) == 0),
        "residual_length": (int, 64, "a positive multiple of group_size (the streaming buffer)", lambda v: v > 0),
        "rank": (int, 2, "an integer in [0, 16] (0: no low-rank term)", lambda v: 0 <= v <= 16),
        "outliers": (float, 0.02, "a share in [0, 0.5) (0: no outliers)", lambda v: 0 <= v < 0.5),
        "iterations": (int, 3, "a positive number of power-iteration rounds", lambda v: v > 0),
    }

    def check_budget(self):
        check_grouped_residual(self)
        if self.rank > self.residual_length:
            raise ValueError(f"option rank={self.rank} of method {self.name!r} must be at most "
                             f"residual_length={self.residual_length}")

    @property
    def quantization(self) -> GEARCodec:
        return GEARCodec(self.bits, self.group_size, self.residual_length, self.rank, self.outliers, self.iterations)
