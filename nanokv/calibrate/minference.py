"""MInference's pattern search (MInference 1.0, arXiv 2407.02490; nanokv/methods/minference.py):
per layer and query head, which of A-shape, Vertical-Slash and Block-Sparse keeps the most of the
head's attention at one budget.

The model runs over the calibration text with a dense attention of its own (calibrate/dense.py)
that hands each layer's post-RoPE queries and keys to a recorder. For each query head the recorder
takes the dense causal softmax attention, builds each pattern's tile mask exactly as the method
does online (its vertical and slash lines from the last `last_q` queries, its blocks from pooled
queries and keys), and scores the pattern by its recall: the attention mass inside the mask,
averaged over the later half of the queries (the official search averages rows 2500 on of its
sample: the rows that have many keys to skip). Recalls are averaged over samples; each head gets
the pattern of highest recall (ties: the earlier of A-shape, Vertical-Slash, Block-Sparse, the
cheapest to build). The official search (microsoft/MInference minference_forward.py search_pattern)
scores a few sizes of each pattern on one sample under a FLOPs target; here one budget sets every
pattern's size (the method's split), by default a quarter of the sample's tokens.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import run_dense


@torch.inference_mode()
def minference_patterns(model, config, texts: list[list[int]], budget: int, tile_size: int, last_q: int,
                        progress=None) -> tuple[list[list[int]], list[list[list[float]]]]:
    """-> (patterns [L][Hq]: the index into methods.minference.PATTERNS of each head's best pattern,
    recalls [L][Hq][3]: each pattern's mean recall)."""
    from nanokv.methods.base import SparsePrefillView
    from nanokv.methods.minference import PATTERNS, MInference

    method = MInference(budget=budget, tile_size=tile_size, last_q=last_q, pattern=PATTERNS[0])
    L, Hq = config.num_layers, config.num_heads
    recalls = torch.zeros(L, Hq, len(PATTERNS), dtype=torch.float64)

    def record(layer, q, k, sliding_window):
        T, _, D = q.shape
        positions = torch.arange(T, device=q.device)
        view = SparsePrefillView(layer, L, q, k, positions)
        keys = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
        logits = torch.einsum("thd,shd->hts", q.float(), keys) / D ** 0.5
        causal = positions[None, :] <= positions[:, None]
        probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)              # [Hq, T, T]
        later = slice(T // 2, T)
        heads = torch.arange(Hq, device=q.device)
        n = -(-T // tile_size)
        lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=q.device)
        for kind, build in enumerate((method.a_shape, method.vertical_slash, method.block_sparse)):
            tiles = (build(view, heads) | eye) & lower                                    # as SparsePrefill.tile_mask
            kept = tiles.repeat_interleave(tile_size, 1).repeat_interleave(tile_size, 2)[:, :T, :T]
            recalls[layer, :, kind] += (probs[:, later] * kept[:, later]).sum(-1).mean(-1).double().cpu()

    for ids in texts:
        run_dense(model, ids, record)
        if progress:
            progress()
    recalls /= max(1, len(texts))
    # ties to the earliest pattern: argmax returns the first maximum
    return recalls.argmax(dim=-1).tolist(), recalls.float().tolist()
