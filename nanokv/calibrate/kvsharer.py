"""KVSharer's layer pairs: which layers may read another layer's KV instead of keeping their own.

Paper: KVSharer: Efficient Inference via Layer-Wise Dissimilar KV Cache Sharing (Yang et al.,
2024), arXiv 2410.18517; official code yangyifei729/KVSharer. Over the calibration samples, each
layer's keys and values are averaged sample by sample; every pair of layers (i > j) is ranked by
the Euclidean distance between those averages (per token and head, then the mean; keys' and
values' distances averaged), most DISSIMILAR first, the paper's finding. Down that ranking,
layer i is tried reading layer j's KV (a chain resolves to its root: j may read another layer's
already); the try stays when the final hidden states (flattened over the sample's tokens) keep a
cosine similarity above `threshold` to the unshared model's, averaged over the samples. A layer
shares at most once; the search stops after `share_layers` accepted pairs. Since it is greedy,
the first k accepted pairs are what a search for k would accept, so one artifact serves every
smaller share (the method takes the first round(compression x L)).

Defaults from the official code (yangyifei729/KVSharer @ 39e5c19, test_llama.ipynb): 30 samples
of 64 tokens, threshold 0.5; `share_layers` defaults to half the layers here (the paper shares
12.5-25%). What differs: the samples are nanokv's prose haystack, not the official
data/wiki_demo.txt lines.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import run_dense
from nanokv.methods.kvsharer import layer_sources


def ranked_pairs(mean_keys: torch.Tensor, mean_values: torch.Tensor) -> list[tuple[int, int]]:
    """mean_keys, mean_values [L, H, T, D]: each layer's KV averaged over samples -> every pair
    (i, j), i > j, most distant first: the L2 distance over D, averaged over heads and tokens, the
    keys' and values' averaged."""
    L = mean_keys.shape[0]
    distance = {}
    for i in range(L):
        for j in range(i):
            k = (mean_keys[i] - mean_keys[j]).norm(dim=-1).mean()
            v = (mean_values[i] - mean_values[j]).norm(dim=-1).mean()
            distance[i, j] = float((k + v) / 2)
    return sorted(distance, key=lambda pair: -distance[pair])


def greedy_pairs(ranked, similarity, share_layers: int, threshold: float) -> list[list[int]]:
    """Walk `ranked` pairs; keep (i, j) when similarity(pairs so far + (i, j)) > threshold; a layer
    shares once; stop at `share_layers` pairs."""
    accepted, shared = [], set()
    for later, earlier in ranked:
        if len(accepted) >= share_layers:
            break
        if later in shared:
            continue
        if similarity(accepted + [[later, earlier]]) > threshold:
            accepted.append([later, earlier])
            shared.add(later)
    return accepted


def kvsharer_pairs(model, config, texts: list[list[int]], share_layers: int, threshold: float,
                   progress=None) -> tuple[list[list[int]], list[float]]:
    """The accepted (later, earlier) pairs in order, and the similarity each was accepted at."""
    L = config.num_layers
    identity = list(range(L))
    keys, values, reference = 0, 0, []
    for ids in texts:  # the unshared model: its KV averages and final hidden states
        hidden, kv = run_dense(model, ids, sources=identity)
        keys = keys + torch.stack([kv[layer][0].float().transpose(0, 1) for layer in range(L)]) / len(texts)
        values = values + torch.stack([kv[layer][1].float().transpose(0, 1) for layer in range(L)]) / len(texts)
        reference.append(hidden.flatten())
    similarities = []

    def similarity(pairs):
        sources = layer_sources(pairs, L)
        total = sum(float(torch.cosine_similarity(run_dense(model, ids, sources=sources)[0].flatten(), ref, dim=0))
                    for ids, ref in zip(texts, reference))
        if progress:
            progress()
        similarities.append(total / len(texts))
        return similarities[-1]

    accepted = greedy_pairs(ranked_pairs(keys, values), similarity, share_layers, threshold)
    kept = [s for s in similarities if s > threshold][:len(accepted)]
    return accepted, kept
