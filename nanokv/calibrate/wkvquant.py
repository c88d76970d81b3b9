"""WKVQuant's smoothing and clipping parameters (nanokv/methods/wkvquant.py) from calibration text.

One dense pass per sample records every layer's keys and values (post-RoPE, as the cache stores
them) and its last `QUERIES` queries. Per layer, over all samples and kv-heads: each channel's
centre (max + min) / 2 and radius (max - min) / 2. Then, per bit width (2, 4, 8), per layer and
for keys and values apart (the other exact): alpha on ALPHAS with no clipping, then the clip ratio
on CLIPS with that alpha, each chosen by the least squared error of the layer's attention output
for the recorded queries (over all their keys) when the keys (or values) are smoothed, quantized
token-wise and read back by the codec's own arithmetic. This is the CPU-cheap stand-in for the
paper's cross-block reconstruction regularization (see the method's docstring).
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import DenseAttention
from nanokv.methods.wkvquant import ALPHAS, CLIPS, clipped_token_quantize, smoothing_scale

QUERIES = 64       # the last queries of each sample whose attention output is matched
SEARCH_BITS = (2, 4, 8)


class RecordAttention(DenseAttention):
    """DenseAttention that keeps each layer's keys, values and last QUERIES queries (float32)."""

    def __init__(self, positions, store: dict):
        super().__init__(positions)
        self.store = store

    def __call__(self, layer, q, k, v, sliding_window):
        self.store.setdefault(layer, []).append((q[-QUERIES:].float(), k.float(), v.float(), sliding_window))
        return super().__call__(layer, q, k, v, sliding_window)


def read_back(x: torch.Tensor, center, radius, alpha: float, clip: float, bits: int) -> torch.Tensor:
    """x [T, H, D] smoothed, quantized token-wise and read back (the codec's arithmetic)."""
    scale = smoothing_scale(radius, alpha)
    codes, step, zero = clipped_token_quantize((x - center) / scale, bits, clip)
    return (codes.float() * step.float() + zero.float()) * scale + center


def output_error(samples, kind: str, center, radius, alpha: float, clip: float, bits: int) -> float:
    """Squared error of the recorded queries' attention outputs with `kind` ("k" or "v") read back."""
    from nanokv.kernels.reference import attention_by_position

    total = 0.0
    for q, k, v, window in samples:
        T = len(k)
        q_pos, k_pos = torch.arange(T - len(q), T, device=k.device), torch.arange(T, device=k.device)
        exact = attention_by_position(q, k, v, q_pos, k_pos, window)
        if kind == "k":
            approx = attention_by_position(q, read_back(k, center, radius, alpha, clip, bits), v, q_pos, k_pos, window)
        else:
            approx = attention_by_position(q, k, read_back(v, center, radius, alpha, clip, bits), q_pos, k_pos, window)
        total += float((approx - exact).double().square().sum())
    return total


@torch.inference_mode()
def wkvquant_parameters(model, config, texts: list[list[int]], progress=None) -> dict:
    """-> {k_center, k_radius, v_center, v_radius: [L][D]; search: {bits: {k_alpha, k_clip, v_alpha,
    v_clip: [L]}}} as lists (the artifact's fields)."""
    device = model.inv_freq.device
    store: dict = {}
    for ids in texts:
        positions = torch.arange(len(ids), device=device)
        model(torch.tensor(ids, device=device), positions, RecordAttention(positions, store))
        if progress:
            progress()
    out = {f"{kind}_{stat}": [] for kind in "kv" for stat in ("center", "radius")}
    search = {str(bits): {f"{kind}_{p}": [] for kind in "kv" for p in ("alpha", "clip")} for bits in SEARCH_BITS}
    for layer in range(config.num_layers):
        samples = store[layer]
        for i, kind in enumerate("kv"):
            xs = torch.cat([s[1 + i].flatten(0, 1) for s in samples])           # [tokens x heads, D]
            high, low = xs.amax(0), xs.amin(0)
            center, radius = (high + low) / 2, (high - low) / 2
            out[f"{kind}_center"].append(center.tolist())
            out[f"{kind}_radius"].append(radius.tolist())
            for bits in SEARCH_BITS:
                alpha = min(ALPHAS, key=lambda a: output_error(samples, kind, center, radius, a, 1.0, bits))
                clip = min(CLIPS, key=lambda c: output_error(samples, kind, center, radius, alpha, c, bits))
                search[str(bits)][f"{kind}_alpha"].append(alpha)
                search[str(bits)][f"{kind}_clip"].append(clip)
    return {**out, "search": search}
