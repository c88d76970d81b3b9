"""SKVQ's calibration (nanokv/methods/skvq.py): per layer and kv-head, each channel's cluster (channel
reordering), and per layer the clip ratios of least error.

The model runs over calibration text; each layer's keys (taken back before RoPE) and values are
read (calibrate/kvquant.PreRopeRecorder), the first SINKS tokens of each text left out (the
codec keeps them whole). Per layer, kv-head and channel the min and max over all tokens are kept;
the channels of a head are then clustered into head_dim / g groups by k-means on those (min, max)
points (Lloyd's, started from the channels sorted by range), for each group size g the method
offers. Up to `per_sample` tokens of each text are kept per layer, and on them each layer's clip
ratio for keys and for values, per bit width and group size, is the one of a grid (0.80, 0.81, ..,
1.00) whose quantization (the codec's own, methods/skvq.group_quantize) has the least squared error.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.kvquant import run_pre_rope

SINKS = 5
CLIPS = tuple(round(0.80 + 0.01 * i, 2) for i in range(21))
BITS = (2, 4, 8)


def cluster_channels(low: torch.Tensor, high: torch.Tensor, groups: int, iterations: int = 50) -> torch.Tensor:
    """low, high [D] -> each channel's cluster [D] in 0..groups-1, by k-means on the points (low,
    high), clusters numbered by their centre's range (narrowest first)."""
    points = torch.stack([low, high], -1).double()
    D = len(points)
    by_range = torch.argsort(high - low)
    centres = points[by_range[((torch.arange(groups, device=points.device) + 0.5) * D / groups).long()]]
    for _ in range(iterations):
        which = torch.cdist(points, centres).argmin(1)
        for c in range(groups):
            if bool((which == c).any()):
                centres[c] = points[which == c].mean(0)
    which = torch.cdist(points, centres).argmin(1)
    rank = torch.argsort(torch.argsort(centres[:, 1] - centres[:, 0]))
    return rank[which]


def best_clip(x: torch.Tensor, clusters: torch.Tensor, groups: int, bits: int) -> float:
    """x [H, T, D] float32, clusters [H, D] -> the clip ratio of CLIPS with the least squared error
    (of those that tie, the largest)."""
    from nanokv.methods.skvq import group_dequantize, group_quantize

    errors = []
    for clip in CLIPS:
        codes, scale, zero = group_quantize(x, clusters, groups, bits, clip)
        errors.append(float(((group_dequantize(codes, scale, zero, clusters) - x) ** 2).sum()))
    return CLIPS[min(range(len(CLIPS)), key=lambda i: (errors[i], -i))]   # ties: the least clipping


def skvq_calibration(model, config, texts: list[list[int]], per_sample: int = 256, seed: int = 0,
                     progress=None) -> dict[str, torch.Tensor]:
    """-> {k_cluster_g, v_cluster_g [L, H, D] (int64) for each offered g <= head_dim dividing it,
    k_clip_b_g, v_clip_b_g [L] for each bit width b, inv_freq [L, D / 2]}."""
    from nanokv.methods.skvq import GROUPS

    L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
    gen = torch.Generator(device="cpu").manual_seed(seed)
    big = torch.finfo(torch.float32).max
    low = {kind: torch.full((L, H, D), big, device="cpu") for kind in "kv"}
    high = {kind: torch.full((L, H, D), -big, device="cpu") for kind in "kv"}
    kept = {kind: [[] for _ in range(L)] for kind in "kv"}

    def seen(layer, pre_k, v):
        for kind, x in (("k", pre_k[SINKS:]), ("v", v[SINKS:])):
            x = x.cpu()
            low[kind][layer] = torch.minimum(low[kind][layer], x.amin(0))
            high[kind][layer] = torch.maximum(high[kind][layer], x.amax(0))
            pick = torch.randperm(len(x), generator=gen, device="cpu")[:per_sample]
            kept[kind][layer].append(x[pick])

    run_pre_rope(model, texts, seen, progress)
    out = {}
    for g in (g for g in GROUPS if g <= D and D % g == 0):
        for kind in "kv":
            clusters = torch.stack([torch.stack([cluster_channels(low[kind][l, h], high[kind][l, h], D // g)
                                                 for h in range(H)]) for l in range(L)])
            out[f"{kind}_cluster_{g}"] = clusters
            for bits in BITS:
                clips = [best_clip(torch.cat(kept[kind][l]).transpose(0, 1).contiguous(), clusters[l], D // g, bits)
                         for l in range(L)]
                out[f"{kind}_clip_{bits}_{g}"] = torch.tensor(clips, device="cpu")
    out["inv_freq"] = model.inv_freq.float().cpu().expand(L, -1).contiguous()
    return out
