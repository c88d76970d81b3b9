"""kvquant: keys quantized per channel before RoPE, values per token, on non-uniform per-layer
codebooks, with ~1% outliers kept sparse in float16 and the first token in full precision.

Paper: KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization (Hooper
et al., NeurIPS 2024), arXiv 2401.18079. Algorithm, per cold block of R tokens of one kv-head:
1. keys are taken back before RoPE (rotated by minus their position's angle): pre-RoPE keys have
   steady per-channel outliers, which RoPE smears across channel pairs;
2. dense-and-sparse: the ~1% of entries furthest from their vector's centre (keys: per channel,
   values: per token, in units of its spread) are kept exactly, float16 with their index, in a
   sparse list; the first token of the sequence (the attention sink) stays whole in float16;
3. the rest are normalized to [-1, 1] (keys per channel, values per token: centre and half-range)
   and each is stored as the index of its nearest codebook entry: 2^bits non-uniform levels per
   layer, for keys and for values, found offline by k-means over normalized calibration
   activations (`python -m nanokv.calibrate kvquant`, nanokv/calibrate/kvquant.py).
Decoding reads codebook[code] * half-range + centre, puts the outliers and the sink back and
applies RoPE at each token's stored position.

Defaults from the official code (SqueezeAILab/KVQuant @ 2f92e8b, quant/README.md): nuq at 4, 3 or
2 bits with 1% outliers (`--nuq --include_sparse --sparsity-threshold 0.99`), `--first_few_fp16 1`,
16 calibration samples of 2,048 tokens. Here bits=2 (4 also), outliers=0.01, block 128 tokens.

What differs:
- Codebooks are plain k-means (the paper's Fisher weighting, which needs the loss gradient of
  every K and V activation, is left out: its "calibration-light" variant). 3 bits are not offered
  (codes are packed 2 or 4 to a nibble boundary).
- Per-channel key ranges (centre, half-range) and outlier thresholds are measured on each block
  of R tokens when it is encoded and stored with it (float16), not calibrated offline; the sparse
  list has a fixed room per block (ceil(outliers * R * D) entries each for K and V), filled with
  the entries furthest out (the paper's thresholds give a varying count).
- The newest tokens (up to R - 1, R = block_size) wait in full precision in the tiered cache's
  residual, as KIVI's; the paper quantizes each token on arrival.
- Positions are stored per token (int32): a cold block may hold any tokens (after eviction), and
  RoPE is re-applied from them. No Q-Norm, no custom CUDA kernel (the twin decodes the blocks).
"""

from __future__ import annotations

import math

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import pack, unpack
from nanokv.methods.base import CALIBRATION_FILE, Method

FP16 = torch.float16


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin [..., D] float32 of positions [...] (rotate-half layout, nanokv/models/rope.py)."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """RoPE by +angle (sign 1) or back by -angle (sign -1), x [..., D] float32."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * (sign * sin)


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest entry of a sorted codebook [n] for every entry of x."""
    edges = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(x.contiguous(), edges).to(torch.uint8)


def outlier_room(fraction: float, tokens: int, head_dim: int) -> int:
    return max(1, math.ceil(fraction * tokens * head_dim))


def split_outliers(x: torch.Tensor, dim: int, room: int, keep: torch.Tensor):
    """Dense-and-sparse: x [N, R, D] float32 -> (flat indices [N, room] int64 of the `room` entries
    furthest from their vector's mean along `dim` in units of its standard deviation (keys: dim
    -2, per channel; values: dim -1, per token), their values [N, room], and the dense mask
    [N, R, D]: True where an entry is neither an outlier nor in a row outside `keep` [N, R])."""
    weight = keep[..., None].float().expand_as(x)
    count = weight.sum(dim, keepdim=True).clamp(min=1)
    mean = (x * weight).sum(dim, keepdim=True) / count
    std = (((x - mean) ** 2 * weight).sum(dim, keepdim=True) / count).sqrt()
    score = ((x - mean).abs() / std.clamp(min=1e-6)) * weight   # rows not kept (the sink) never chosen
    idx = score.flatten(1).topk(room, dim=1).indices
    dense = keep[..., None].expand_as(x).clone().flatten(1)
    dense.scatter_(1, idx, False)
    return idx, x.flatten(1).gather(1, idx), dense.view_as(x)


def dense_range(x: torch.Tensor, dense: torch.Tensor, dim: int):
    """Centre and half-range (float16, then read back as float32) of the dense entries of x along
    `dim` (an axis with none: centre 0, half-range 0)."""
    big = torch.finfo(torch.float32).max
    high = torch.where(dense, x, -big).amax(dim, keepdim=True)
    low = torch.where(dense, x, big).amin(dim, keepdim=True)
    empty = ~dense.any(dim, keepdim=True)
    high, low = torch.where(empty, 0.0, high), torch.where(empty, 0.0, low)
    centre, half = ((high + low) / 2).to(FP16).float(), ((high - low) / 2).to(FP16).float()
    return centre, half


def normalized(x, centre, half):
    return ((x - centre) / torch.where(half > 0, half, 1.0)).clamp(-1, 1)


class KVQuantCodec(Codec):
    """One cold block: pre-RoPE keys and values as packed codebook indices, float16 per-channel key
    and per-token value ranges, the sparse outliers, the tokens' positions and the sink."""
    needs_positions = True

    def __init__(self, bits: int, k_codebooks: torch.Tensor, v_codebooks: torch.Tensor, inv_freq: torch.Tensor,
                 outliers: float = 0.01, block_size: int = 128, sinks: int = 1):
        self.bits, self.outliers, self.block_size, self.sinks = bits, outliers, block_size, sinks
        self.k_codebooks, self.v_codebooks = k_codebooks.float(), v_codebooks.float()  # [L, 2^bits], sorted
        self.inv_freq = inv_freq.float()                                                  # [D / 2]
        self.on = {}  # device -> (k_codebooks, v_codebooks, inv_freq) there

    def tables(self, device):
        if device not in self.on:
            self.on[device] = tuple(t.to(device) for t in (self.k_codebooks, self.v_codebooks, self.inv_freq))
        return self.on[device]

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        R, D, room = self.block_size, head_dim, outlier_room(self.outliers, self.block_size, head_dim)
        codes = (torch.uint8, (R, D * self.bits // 8))
        index = torch.int16 if R * D <= 1 << 15 else torch.int32
        return {"k_codes": codes, "v_codes": codes,
                "k_centre": (FP16, (D,)), "k_half": (FP16, (D,)),           # per channel
                "v_centre": (FP16, (R,)), "v_half": (FP16, (R,)),           # per token
                "k_out_index": (index, (room,)), "k_out_value": (FP16, (room,)),
                "v_out_index": (index, (room,)), "v_out_value": (FP16, (room,)),
                "pos": (torch.int32, (R,)),
                "k_sink": (FP16, (self.sinks, D)), "v_sink": (FP16, (self.sinks, D)), "sink_rows": (torch.uint8, (1,))}

    def encode(self, k, v, layer, importance, positions=None, heads=None):
        N, R, D = k.shape
        k_books, v_books, inv_freq = self.tables(k.device)
        # the sinks first, so that they sit in rows 0..sinks-1 (a block's order is free)
        order = torch.argsort((positions >= self.sinks).to(torch.int8), dim=1, stable=True)
        k, v = k.gather(1, order[..., None].expand(-1, -1, D)), v.gather(1, order[..., None].expand(-1, -1, D))
        positions = positions.gather(1, order)
        sink = positions < self.sinks                                              # [N, R], rows 0..s-1
        cos, sin = rope_angles(positions, inv_freq)
        pre = rotate(k.float(), cos, sin, -1.0)                                    # keys before RoPE
        values = v.float()
        room = outlier_room(self.outliers, R, D)
        fields = {"pos": positions.to(torch.int32), "sink_rows": sink.sum(1, keepdim=True).to(torch.uint8)}
        s = self.sinks
        fields["k_sink"], fields["v_sink"] = k[:, :s].to(FP16), v[:, :s].to(FP16)  # as cached: after RoPE
        for name, x, dim, books in (("k", pre, -2, k_books), ("v", values, -1, v_books)):
            idx, out, dense = split_outliers(x, dim, room, ~sink)
            centre, half = dense_range(x, dense, dim)
            codes = nearest(normalized(x, centre, half), books[layer])
            fields[f"{name}_codes"] = pack(codes, self.bits)
            fields[f"{name}_centre"], fields[f"{name}_half"] = centre.squeeze(dim).to(FP16), half.squeeze(dim).to(FP16)
            fields[f"{name}_out_index"], fields[f"{name}_out_value"] = idx.to(torch.int32), out.to(FP16)
        return fields

    def decode(self, fields, layer):
        f = fields
        k_books, v_books, inv_freq = self.tables(f["k_codes"].device)
        out = []
        for name, books, dim in (("k", k_books, -2), ("v", v_books, -1)):
            x = books[layer][unpack(f[f"{name}_codes"], self.bits).long()]                  # [..., R, D]
            centre, half = f[f"{name}_centre"].float().unsqueeze(dim), f[f"{name}_half"].float().unsqueeze(dim)
            x = (x * half + centre).flatten(-2)
            x = x.scatter(-1, f[f"{name}_out_index"].long(), f[f"{name}_out_value"].float())
            out.append(x.view(*f[f"{name}_codes"].shape[:-1], f[f"{name}_codes"].shape[-1] * 8 // self.bits))
        k, v = out
        cos, sin = rope_angles(f["pos"], inv_freq)
        k = rotate(k, cos, sin)
        return restore_sinks(k, v, f, self.sinks)


def restore_sinks(k, v, fields, sinks: int):
    """Rows 0..sink_rows-1 of each block read back as the float16 sink copies (already after RoPE)."""
    rows = torch.arange(sinks, device=k.device) < fields["sink_rows"].long()                 # [..., s]
    k[..., :sinks, :] = torch.where(rows[..., None], fields["k_sink"].float(), k[..., :sinks, :])
    v[..., :sinks, :] = torch.where(rows[..., None], fields["v_sink"].float(), v[..., :sinks, :])
    return k, v


class KVQuant(Method):
    name = "kvquant"
    description = "pre-RoPE per-channel keys, per-token values on calibrated non-uniform codebooks; 1% sparse outliers"
    paper = "https://arxiv.org/abs/2401.18079"
    calibration = "kvquant"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+kvquant"
    options = {
        "bits": (int, 2, "2 or 4", lambda v: v in (2, 4)),
        "outliers": (float, 0.01, "a fraction in (0, 0.5) of each block's entries kept sparse",
                     lambda v: 0 < v < 0.5),
        "block_size": (int, 128, "a positive multiple of 8 (tokens per quantized block)",
                       lambda v: v > 0 and v % 8 == 0),
        "calibration_file": CALIBRATION_FILE,
    }
    codec = None  # made from the artifact, once bound

    def bind_calibration(self, artifact: dict):
        t = artifact["tensors"]
        name = f"k_codebook_{self.bits}"
        if name not in t:
            raise ValueError(f"the kvquant calibration holds no {self.bits}-bit codebooks; valid bits: "
                             f"{sorted(int(n.rsplit('_', 1)[1]) for n in t if n.startswith('k_codebook_'))}")
        self.codec = KVQuantCodec(self.bits, t[name], t[f"v_codebook_{self.bits}"], t["inv_freq"][0],
                                  outliers=self.outliers, block_size=self.block_size)

    @property
    def quantization(self) -> KVQuantCodec:
        if self.codec is None:
            raise ValueError("kvquant needs its calibration: run `python -m nanokv.calibrate kvquant --model ...`")
        return self.codec
