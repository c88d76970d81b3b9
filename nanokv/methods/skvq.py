"""skvq: keys and values quantized per token over groups of similar channels (reordered offline),
with clipped ranges, the newest tokens and the attention sinks in full precision.

Paper: SKVQ: Sliding-window Key and Value Cache Quantization for Large Language Models (Duanmu et
al., 2024), arXiv 2405.06219. Offline (`python -m nanokv.calibrate skvq`,
nanokv/calibrate/skvq.py) the channels of each layer's keys and values are clustered by their
range over calibration text (k-means on each channel's (min, max)): channels of one cluster share
a quantization group, so an outlier channel no longer stretches the grid of ordinary ones
(channel reordering), and each layer gets the clip ratio of least error. At run time each token's
keys (before RoPE) and values are quantized per group asymmetrically: min and max over the
group's channels, both times the clip ratio, the scale and the zero point in FP8 (e4m3), b-bit
codes. A sliding window of the newest tokens stays in full precision, and so do the first
`sinks` tokens of the sequence.

Defaults from the official code (cat538/SKVQ @ 282976b, README.md, KV_process.py): K2V2, group
128, window 128, pre-RoPE keys, 5 sink tokens, FP8 scales (`k2-v2-g128-w128-reorder-pre_rope-
clip-sink5-fp8`), clip ratios 0.91 to 0.97 (one per layer).

What differs:
- Clusters are within a kv-head (the cache stores each head's block apart); the official code
  clusters the whole layer's 4,096 channels into 32 groups of unequal size. group_size=32 by
  default (head_dim / 32 clusters per head: 2 for head_dim 64, 4 for 128); group 128 over a head of
  64 or 128 channels would be one group per token, where reordering changes nothing.
- The window is the tiered cache's residual: 0 to R - 1 of the newest tokens (R = window = the
  block size) are in full precision between steps, not always the newest R (as KIVI's, quant_cache.py).
- Clip ratios are searched per layer and for keys and values apart (grid 0.80..1.00), where the
  official code uses one hand-set ratio per layer for both. Scale and zero point are rounded to FP8
  before the codes are taken (the nearest codes on the stored grid).
- Sinks are kept as float16 copies in every block (the first block is the only one that uses them):
  2 x sinks x head_dim x 2 bytes per block. Positions are stored per token (int32) to re-apply RoPE.
- No smoothing (the official code can also scale channels, off in its reported settings), no
  custom CUDA kernel (the twin decodes the blocks).
"""

from __future__ import annotations

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import pack, unpack
from nanokv.methods.base import CALIBRATION_FILE, Method
from nanokv.methods.kvquant import FP16, restore_sinks, rope_angles, rotate

FP8 = torch.float8_e4m3fn
GROUPS = (16, 32, 64, 128)


def fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to FP8 e4m3 (saturated to its range), read back as float32."""
    return x.clamp(-448, 448).to(FP8).float()


def group_quantize(x: torch.Tensor, clusters: torch.Tensor, groups: int, bits: int, clip: float):
    """x [N, R, D] float32, clusters [N, D] (each channel's group) -> codes uint8 [N, R, D], scale
    and zero float32 [N, R, groups] (FP8-exact): per token and group, min and max over its channels,
    each times `clip`."""
    onehot = clusters[:, None, :, None] == torch.arange(groups, device=x.device)         # [N, 1, D, G]
    big = torch.finfo(torch.float32).max
    high = torch.where(onehot, x[..., None], -big).amax(-2) * clip                       # [N, R, G]
    low = torch.where(onehot, x[..., None], big).amin(-2) * clip
    top = 2 ** bits - 1
    zero, scale = fp8(low), fp8((high - low) / top)
    at = clusters[:, None, :].expand(x.shape)
    z, s = zero.gather(-1, at), scale.gather(-1, at)
    codes = ((x - z) / torch.where(s > 0, s, 1.0)).round().clamp(0, top)
    return codes.to(torch.uint8), scale, zero


def group_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, clusters: torch.Tensor):
    """codes [..., R, D], scale, zero [..., R, G], clusters [..., D] -> float32 [..., R, D]."""
    at = clusters[..., None, :].expand(codes.shape)
    return codes.float() * scale.gather(-1, at) + zero.gather(-1, at)


class SKVQCodec(Codec):
    """One cold block: pre-RoPE keys and values as packed per-token group codes, FP8 scales and zero
    points per (token, group), the tokens' positions, the kv-head (whose channel clusters apply) and
    the sinks."""
    needs_positions = True

    def __init__(self, k_bits: int, v_bits: int, groups: int, k_clusters, v_clusters, k_clip, v_clip,
                 inv_freq, block_size: int = 128, sinks: int = 5):
        self.k_bits, self.v_bits, self.groups, self.block_size, self.sinks = k_bits, v_bits, groups, block_size, sinks
        self.k_clusters, self.v_clusters = k_clusters.long(), v_clusters.long()   # [L, H, D]
        self.k_clip, self.v_clip = k_clip.float().tolist(), v_clip.float().tolist()
        self.inv_freq = inv_freq.float()
        self.on = {}

    def tables(self, device):
        if device not in self.on:
            self.on[device] = tuple(t.to(device) for t in (self.k_clusters, self.v_clusters, self.inv_freq))
        return self.on[device]

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        R, D, G = self.block_size, head_dim, self.groups
        scales = (torch.uint8, (R, G))  # FP8 e4m3 bits
        return {"k_codes": (torch.uint8, (R, D * self.k_bits // 8)), "v_codes": (torch.uint8, (R, D * self.v_bits // 8)),
                "k_scale": scales, "k_zero": scales, "v_scale": scales, "v_zero": scales,
                "pos": (torch.int32, (R,)), "head": (torch.uint8, (1,)),
                "k_sink": (FP16, (self.sinks, D)), "v_sink": (FP16, (self.sinks, D)), "sink_rows": (torch.uint8, (1,))}

    def encode(self, k, v, layer, importance, positions=None, heads=None):
        N, R, D = k.shape
        k_clusters, v_clusters, inv_freq = self.tables(k.device)
        order = torch.argsort((positions >= self.sinks).to(torch.int8), dim=1, stable=True)  # sinks first
        k, v = k.gather(1, order[..., None].expand(-1, -1, D)), v.gather(1, order[..., None].expand(-1, -1, D))
        positions = positions.gather(1, order)
        cos, sin = rope_angles(positions, inv_freq)
        fields = {"pos": positions.to(torch.int32), "head": heads[:, None].to(torch.uint8),
                  "sink_rows": (positions < self.sinks).sum(1, keepdim=True).to(torch.uint8),
                  "k_sink": k[:, :self.sinks].to(FP16), "v_sink": v[:, :self.sinks].to(FP16)}
        for name, x, clusters, bits, clip in (("k", rotate(k.float(), cos, sin, -1.0), k_clusters, self.k_bits,
                                               self.k_clip[layer]),
                                              ("v", v.float(), v_clusters, self.v_bits, self.v_clip[layer])):
            codes, scale, zero = group_quantize(x, clusters[layer][heads], self.groups, bits, clip)
            fields[f"{name}_codes"] = pack(codes, bits)
            fields[f"{name}_scale"] = scale.to(FP8).view(torch.uint8)
            fields[f"{name}_zero"] = zero.to(FP8).view(torch.uint8)
        return fields

    def decode(self, fields, layer):
        f = fields
        k_clusters, v_clusters, inv_freq = self.tables(f["k_codes"].device)
        heads = f["head"][..., 0].long()
        k, v = (group_dequantize(unpack(f[f"{name}_codes"], bits), f[f"{name}_scale"].view(FP8).float(),
                                 f[f"{name}_zero"].view(FP8).float(), clusters[layer][heads])
                for name, bits, clusters in (("k", self.k_bits, k_clusters), ("v", self.v_bits, v_clusters)))
        cos, sin = rope_angles(f["pos"], inv_freq)
        return restore_sinks(rotate(k, cos, sin), v, f, self.sinks)


class SKVQ(Method):
    name = "skvq"
    description = "per-token group quantization over reordered (clustered) channels, clipped, FP8 scales; window and sinks in full precision"
    paper = "https://arxiv.org/abs/2405.06219"
    calibration = "skvq"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+skvq"
    options = {
        "k_bits": (int, 2, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "v_bits": (int, 2, "2, 4 or 8", lambda v: v in (2, 4, 8)),
        "group_size": (int, 32, f"one of {', '.join(map(str, GROUPS))} (channels per group, at most head_dim)",
                       lambda v: v in GROUPS),
        "window": (int, 128, "a positive multiple of 8 (the full-precision residual, tokens per quantized block)",
                   lambda v: v > 0 and v % 8 == 0),
        "sinks": (int, 5, "an integer in [1, 64] (the first tokens kept in full precision)", lambda v: 1 <= v <= 64),
        "calibration_file": CALIBRATION_FILE,
    }
    codec = None  # made from the artifact, once bound

    def check_budget(self):
        if self.sinks > self.window:
            raise ValueError(f"option sinks={self.sinks} of method skvq must be at most window={self.window}")

    def bind_calibration(self, artifact: dict):
        t, D = artifact["tensors"], artifact["head_dim"]
        g = min(self.group_size, D)
        if D % g:
            raise ValueError(f"option group_size={self.group_size} of method skvq must divide head_dim={D}")
        bits = (self.k_bits, self.v_bits)
        need = [f"k_cluster_{g}", f"v_cluster_{g}", f"k_clip_{bits[0]}_{g}", f"v_clip_{bits[1]}_{g}", "inv_freq"]
        missing = [n for n in need if n not in t]
        if missing:
            raise ValueError(f"the skvq calibration holds no {missing[0]}; valid group sizes there: "
                             f"{sorted(int(n.rsplit('_', 1)[1]) for n in t if n.startswith('k_cluster_'))}")
        self.codec = SKVQCodec(*bits, D // g, t[need[0]], t[need[1]], t[need[2]], t[need[3]], t["inv_freq"][0],
                               block_size=self.window, sinks=self.sinks)

    @property
    def quantization(self) -> SKVQCodec:
        if self.codec is None:
            raise ValueError("skvq needs its calibration: run `python -m nanokv.calibrate skvq --model ...`")
        return self.codec
