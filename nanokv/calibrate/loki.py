"""Loki's key bases (Low-Rank Keys for Efficient Sparse Attention, arXiv 2406.02542;
nanokv/methods/loki.py): per layer and kv-head, the principal components of the post-RoPE keys
over calibration text.

The model runs over the text with a dense attention of its own (calibrate/dense.py) that hands
each layer's keys, after RoPE as the cache holds them, to a recorder. Per (layer, kv-head) the
recorder sums k k^T and k over every token; the covariance E[k k^T] - mu mu^T then gives, by its
eigendecomposition, the principal directions (columns by descending variance) and the variance
along each. The official code fits sklearn's PCA per layer on the keys of one head at a time
(hpcgroup/loki, post-rotary keys of WikiText-2 by default: --rotary-type postrotary,
--transform-dataset wikitext); the Gram sums give the same components without holding the
activations.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import run_dense


@torch.inference_mode()
def loki_bases(model, config, texts: list[list[int]], progress=None) -> dict[str, torch.Tensor]:
    """-> {k_basis [L, H, D, D] (column i: the i-th principal direction of the kv-head's post-RoPE
    keys), k_variance [L, H, D] (the variance along each, descending)}."""
    L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
    device = model.inv_freq.device
    gram = torch.zeros(L, H, D, D, dtype=torch.float64, device=device)
    sums = torch.zeros(L, H, D, dtype=torch.float64, device=device)

    def record(layer, q, k, sliding_window):
        k = k.double().transpose(0, 1)                      # [H, T, D]
        gram[layer] += k.transpose(1, 2) @ k
        sums[layer] += k.sum(1)

    tokens = 0
    for ids in texts:
        run_dense(model, ids, record)
        tokens += len(ids)
        if progress:
            progress()
    mean = sums / tokens
    covariance = gram / tokens - mean[..., :, None] * mean[..., None, :]
    variance, basis = torch.linalg.eigh(covariance)        # ascending
    return {"k_basis": basis.flip(-1).float().cpu().contiguous(),
            "k_variance": variance.flip(-1).clamp(min=0).float().cpu().contiguous()}
