"""KVQuant's non-uniform datatypes (nanokv/methods/kvquant.py): per layer, a codebook of 2^bits
levels in [-1, 1] for the keys and one for the values, found by k-means over calibration
activations normalized exactly as the codec normalizes them.

The model runs over calibration text with a dense attention of its own (calibrate/dense.py) that
hands each layer's keys, taken back before RoPE, and values to a recorder. Each head's tokens are cut
into blocks of `block_size` as the cache cuts them; in each block the first token of the text
(the sink) and the ~1% outliers are set aside (methods/kvquant.split_outliers), and the rest is
normalized per channel (keys) or per token (values) to [-1, 1]. Up to `per_sample` of those
numbers per layer and sample are kept, and a 1-D k-means (Lloyd's, started at the quantiles) gives
each layer's levels, for 2 and for 4 bits. KVQuant weights each number by its Fisher information
(the squared gradient of the loss): left out here (unweighted k-means), see the method's docstring.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import DenseAttention

BITS = (2, 4)


class PreRopeRecorder(DenseAttention):
    """DenseAttention that hands `seen(layer, keys, values)` each layer's keys before RoPE and its
    values, float32 [T, H, D], before attending as usual."""

    def __init__(self, positions, inv_freq, seen):
        super().__init__(positions)
        self.inv_freq, self.seen = inv_freq, seen

    def __call__(self, layer, q, k, v, sliding_window):
        from nanokv.methods.kvquant import rope_angles, rotate

        cos, sin = rope_angles(self.positions, self.inv_freq)
        self.seen(layer, rotate(k.float(), cos[:, None], sin[:, None], -1.0), v.float())
        return super().__call__(layer, q, k, v, sliding_window)


@torch.inference_mode()
def run_pre_rope(model, texts: list[list[int]], seen, progress=None):
    """Every text through `model` (positions 0..), `seen` getting each layer's pre-RoPE keys and values."""
    device = model.inv_freq.device
    for ids in texts:
        positions = torch.arange(len(ids), device=device)
        model(torch.tensor(ids, device=device), positions, PreRopeRecorder(positions, model.inv_freq, seen))
        if progress:
            progress()


def kmeans_1d(x: torch.Tensor, n: int, iterations: int = 40) -> torch.Tensor:
    """n sorted levels minimizing the squared distance of the numbers x [M] to their nearest (Lloyd's
    algorithm from the quantiles; a level left with no number stays where it was)."""
    x = x.double()
    levels = torch.quantile(x, (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n)
    for _ in range(iterations):
        edges = (levels[1:] + levels[:-1]) / 2
        which = torch.bucketize(x, edges)
        sums = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, which, x)
        counts = torch.bincount(which, minlength=n).double()
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), levels).sort().values
    return levels.float()


def normalized_samples(pre_k: torch.Tensor, v: torch.Tensor, start: int, block_size: int, outliers: float):
    """The dense numbers of one text's layer as the codec normalizes them: pre_k, v [T, H, D] ->
    (keys' [M], values' [M']) in [-1, 1]. Whole blocks of `block_size` tokens only; the text's first
    token (position `start` 0) is the sink and left out."""
    from nanokv.methods.kvquant import dense_range, normalized, outlier_room, split_outliers

    T, H, D = pre_k.shape
    n = T // block_size * block_size
    out = []
    for x, dim in ((pre_k, -2), (v, -1)):
        blocks = x[:n].view(-1, block_size, H, D).transpose(1, 2).reshape(-1, block_size, D)   # [N, R, D]
        keep = torch.ones(blocks.shape[:2], dtype=torch.bool, device=x.device)
        if start == 0:
            keep.view(-1, H, block_size)[0, :, 0] = False        # every head's first block holds the sink
        _, _, dense = split_outliers(blocks, dim, outlier_room(outliers, block_size, D), keep)
        centre, half = dense_range(blocks, dense, dim)
        out.append(normalized(blocks, centre, half)[dense])
    return out


def kvquant_codebooks(model, config, texts: list[list[int]], block_size: int = 128, outliers: float = 0.01,
                      per_sample: int = 50_000, seed: int = 0, progress=None) -> dict[str, torch.Tensor]:
    """-> {k_codebook_b, v_codebook_b [L, 2^b] for b in BITS, inv_freq [L, D / 2] (the same row in
    every layer: the codec re-applies RoPE with it)}."""
    L = config.num_layers
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples = {kind: [[] for _ in range(L)] for kind in "kv"}

    def seen(layer, pre_k, v):
        for kind, x in zip("kv", normalized_samples(pre_k, v, 0, block_size, outliers)):
            x = x.cpu()
            if len(x) > per_sample:
                x = x[torch.randperm(len(x), generator=gen, device="cpu")[:per_sample]]
            samples[kind][layer].append(x)

    run_pre_rope(model, texts, seen, progress)
    out = {}
    for bits in BITS:
        for kind in "kv":
            out[f"{kind}_codebook_{bits}"] = torch.stack([kmeans_1d(torch.cat(s), 2 ** bits) for s in samples[kind]])
    out["inv_freq"] = model.inv_freq.float().cpu().expand(L, -1).contiguous()
    return out
