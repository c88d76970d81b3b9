"""wkvquant: past-only KV quantization, static per-channel smoothing then clipped token-wise codes.

Paper: WKVQuant: Quantizing Weight and Key/Value Cache for Large Language Models Gains More
(Yue et al., 2024), arXiv 2402.12065. Only the KV half is built here: the paper's weight
quantization (its W4 half, trained with OmniQuant-style learnable clipping) is out of scope, the
model's weights are used as loaded. The KV half:
- past-only quantization: the current token's key and value are used in full precision by its own
  attention; only the past is read quantized (nanokv's residual keeps the newest tokens in full
  precision and hands whole blocks of `residual_length` to the codec);
- two-dimensional quantization: a static per-channel smoothing from calibration, x~ = (x - delta) / s
  (delta the channel's centre, s its scale), then dynamic token-wise quantization of x~: one grid
  per token over the head's channels, asymmetric, its range clipped to clip x [min, max];
- cross-block reconstruction regularization: delta, s and the clip ratios are optimized on
  calibration data against the attention output of the full-precision model
  (`python -m nanokv.calibrate wkvquant`, nanokv/calibrate/wkvquant.py).
Reading back: x = (codes x scale + zero) x s + delta. Defaults: 4 bits (the paper's W4KV4 setting),
the newest 32 tokens at most in full precision.

What differs:
- The optimization is a CPU-cheap closed form plus a grid instead of the paper's gradient descent
  over the smoothing and clipping parameters with a loss over the outputs of the following blocks:
  delta = (max + min) / 2 per channel (Outlier Suppression+'s shift, the paper's initialization);
  s = r^alpha per channel (r = (max - min) / 2, normalized to a geometric mean of 1), alpha on a
  grid {0, .25, .5, .75, 1}; then the clip ratio on {1, .95, .9, .85, .8, .75, .7} (coordinate
  search, alpha first), per layer and per K and V, for each bit width (2, 4, 8), minimizing the
  squared error of that layer's attention output for the last 64 queries of each sample (one
  block, not the paper's cross-block window).
- delta and s are per channel of the head dimension, shared by a layer's kv-heads (the codec sees a
  layer's blocks, not which head each is of); the paper's are per channel of the whole K / V.
- One clip ratio per layer for the token's min and max, not a learned pair per channel.
- Past-only keeps 1 to R - 1 = 31 of the newest tokens in full precision, not just the current one:
  whole blocks of R tokens are quantized at once (a head's residual, see quant_cache.py). Scales
  and zero points are float16.
- Decode reads the cold blocks through the twin (decoded to float32), on CUDA too: the fused
  kernels read KIVI's `code * scale + zero`, not the smoothing undone after it (docs/architecture.md,
  "Which codecs the fused kernels read").
"""

from __future__ import annotations

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import BITS, pack, unpack
from nanokv.methods.base import CALIBRATION_FILE, Method

SCALE_DTYPE = torch.float16
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def smoothing_scale(radius: torch.Tensor, alpha) -> torch.Tensor:
    """s = radius^alpha per channel (radius [..., D]; alpha a number or [...]), divided by its
    geometric mean so the smoothed numbers keep the model's magnitude."""
    alpha = torch.as_tensor(alpha, dtype=radius.dtype, device=radius.device)
    while alpha.dim() < radius.dim():
        alpha = alpha.unsqueeze(-1)
    log = radius.clamp_min(1e-6).log() * alpha
    return (log - log.mean(-1, keepdim=True)).exp()


def clipped_token_quantize(x: torch.Tensor, bits: int, clip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] (smoothed) -> codes (uint8 [..., D]), scale and zero ([..., 1], float16): each token's grid
    from clip x its min to clip x its max (clip a number or [..., 1]); numbers outside take the end codes."""
    x = x.float()
    low = (x.amin(-1, keepdim=True) * clip).to(SCALE_DTYPE).float()
    high = x.amax(-1, keepdim=True) * clip
    scale = ((high - low) / (2 ** bits - 1)).to(SCALE_DTYPE).float()
    codes = ((x - low) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, 2 ** bits - 1)
    return codes.to(torch.uint8), scale.to(SCALE_DTYPE), low.to(SCALE_DTYPE)


class WKVQuantCodec(Codec):
    """Per layer: keys and values smoothed per channel (centre, scale), then `bits`-bit codes per token
    over the head's channels in a clipped range. Stored per block: the packed codes and each token's
    float16 scale and zero point; the smoothing and clip ratios are the model's (one set per layer)."""

    def __init__(self, bits: int, block_size: int, k_center, k_scale, k_clip, v_center, v_scale, v_clip):
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        self.bits, self.block_size = bits, block_size
        # [L, D] centres and scales, [L] clip ratios, float32
        self.k_center, self.k_scale, self.k_clip = k_center, k_scale, k_clip
        self.v_center, self.v_scale, self.v_clip = v_center, v_scale, v_clip
        self.placed: dict = {}  # (kind, device) -> (centres, scales) there: copied once, not every step

    def smoothing(self, kind: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kind, str(device))
        if key not in self.placed:
            center, scale = (self.k_center, self.k_scale) if kind == "k" else (self.v_center, self.v_scale)
            self.placed[key] = (center.to(device), scale.to(device))
        return self.placed[key]

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        R = self.block_size
        codes, per_token = (torch.uint8, (R, head_dim * self.bits // 8)), (SCALE_DTYPE, (R, 1))
        return {"k_codes": codes, "v_codes": codes, "k_scale": per_token, "k_zero": per_token,
                "v_scale": per_token, "v_zero": per_token}

    def encode(self, k, v, layer, importance):
        out = {}
        for kind, x, clip in (("k", k, self.k_clip), ("v", v, self.v_clip)):
            center, scale = self.smoothing(kind, x.device)
            codes, step, zero = clipped_token_quantize((x.float() - center[layer]) / scale[layer], self.bits,
                                                       float(clip[layer]))
            out.update({f"{kind}_codes": pack(codes, self.bits), f"{kind}_scale": step, f"{kind}_zero": zero})
        return out

    def decode(self, fields, layer):
        out = []
        for kind in "kv":
            codes = unpack(fields[f"{kind}_codes"], self.bits).float()
            smoothed = torch.addcmul(fields[f"{kind}_zero"].float(), codes, fields[f"{kind}_scale"].float())
            center, scale = self.smoothing(kind, smoothed.device)
            out.append(torch.addcmul(center[layer], smoothed, scale[layer]))
        return tuple(out)


class WKVQuant(Method):
    name = "wkvquant"
    description = "past-only KV quantization: calibrated per-channel smoothing, then clipped token-wise codes"
    paper = "https://arxiv.org/abs/2402.12065"
    calibration = "wkvquant"
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+wkvquant"
    options = {
        "bits": (int, 4, "2, 4 or 8", lambda v: v in BITS),
        "residual_length": (int, 32, "a power of two from 16 to 128", lambda v: v in (16, 32, 64, 128)),
        "calibration_file": CALIBRATION_FILE,
    }
    smoothing: dict | None = None  # from the calibration: per layer, K and V centres, scales and clip ratios

    def bind_calibration(self, artifact: dict):
        search = artifact["search"][str(self.bits)]
        cpu = lambda rows: torch.tensor(rows, dtype=torch.float32, device="cpu")  # noqa: E731
        self.smoothing = {}
        for kind in "kv":
            radius = cpu(artifact[f"{kind}_radius"])
            self.smoothing.update({f"{kind}_center": cpu(artifact[f"{kind}_center"]),
                                   f"{kind}_scale": smoothing_scale(radius, cpu(search[f"{kind}_alpha"])),
                                   f"{kind}_clip": cpu(search[f"{kind}_clip"])})

    @property
    def quantization(self) -> WKVQuantCodec:
        if self.smoothing is None:
            raise ValueError("method wkvquant has no smoothing yet: it needs its calibration "
                             "(python -m nanokv.calibrate wkvquant --model ...), bound when LLM loads the model")
        return WKVQuantCodec(self.bits, self.residual_length, **self.smoothing)
