"""Squeezed Attention's threshold (nanokv/methods/squeezed_attention.py): the quantiles of the
centroid estimate S over calibration text, for every target sparsity at once.

As the official offline step (squeezedattention/clustering.py: run_clustering, then
run_global_threshold), per text and layer: the keys of all but the text's last `window` tokens are
clustered per kv-head (the method's own k-means, `clusters` centroids per key), each of those last
`window` queries estimates S_i of every cluster (averaged over the kv-head's query heads, as the
method does), S is averaged over those queries and handed to each key of the cluster. The
quantiles 0, 0.01, .., 1 of these per-key values, over all texts, layers and kv-heads, are the
global thresholds ("thresholds"); each layer's alone, its own ("layer_thresholds"). The official
code calibrates on each fixed context itself (and keeps the quantiles 0.5, 0.7, 0.8, 0.9); here
calibration text stands for the contexts to come.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import run_dense
from nanokv.methods.squeezed_attention import GRID, cluster_count, cluster_estimates, kmeans


def quantiles(values: torch.Tensor, grid: int = GRID) -> list[float]:
    """The quantiles 0, 1 / grid, .., 1 of values [n], linearly between the order statistics (numpy's default)."""
    x = values.double().sort().values
    at = torch.linspace(0, 1, grid + 1, dtype=torch.float64) * (len(x) - 1)
    low = at.floor().long().clamp(max=len(x) - 1)
    high = (low + 1).clamp(max=len(x) - 1)
    return (x[low] + (at - low) * (x[high] - x[low])).tolist()


def key_estimates(q: torch.Tensor, k: torch.Tensor, clusters: float, window: int) -> torch.Tensor:
    """One text's post-RoPE queries [T, Hq, D] and keys [T, H, D] at one layer -> [H * n] the S each
    of the n = T - window clustered keys gets, averaged over the last `window` queries."""
    T, H, D = k.shape
    n = T - window
    centroids, labels, sizes = kmeans(k[:n].transpose(0, 1), cluster_count(n, clusters))
    queries = q[n:].float().view(window, H, -1, D)
    est = cluster_estimates(queries, centroids.expand(window, *centroids.shape), sizes.expand(window, *sizes.shape))
    return est.mean(0).gather(-1, labels).flatten()


@torch.inference_mode()
def squeezed_thresholds(model, config, texts: list[list[int]], clusters: float, window: int, progress=None):
    """-> (the global quantiles [GRID + 1], each layer's [L][GRID + 1]) of S over the texts."""
    per_layer = [[] for _ in range(config.num_layers)]

    def record(layer, q, k, sliding_window):
        per_layer[layer].append(key_estimates(q, k, clusters, window).cpu())

    for ids in texts:
        run_dense(model, ids, record)
        if progress:
            progress()
    layers = [torch.cat(values) for values in per_layer]
    return quantiles(torch.cat(layers)), [quantiles(values) for values in layers]
