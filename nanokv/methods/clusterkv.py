"""clusterkv: keep every token, most of them in host memory, and recall whole semantic clusters of keys.

Paper: ClusterKV: Manipulating LLM KV Cache in Semantic Space for Recallable Compression (Guangda
Liu, Chengwei Li, Jieru Zhao, Chenqi Zhang, Minyi Guo; DAC 2025), arXiv 2412.03213; code
sjtu-zhao-lab/ClusterKV. Pages cut by position mix tokens a query needs with tokens it does not;
tokens whose keys point the same way draw similar attention from any query. So ClusterKV clusters
each head's keys by direction (k-means, cosine similarity) once the prompt is cached, and at each
decode step ranks the clusters by q . centroid and recalls whole clusters, best first, until the
budget is filled; the first `sink` tokens are always read and never clustered.
Here, per kv-head of each layer from `skip_layers` on: the newest `device_window` tokens stay on the
device and are always read; the older ones move to the host tier, and `summarize` clusters them
as they move: the prompt's keys into `clusters` clusters (fewer when fewer keys), each later batch
(a decode block) into new clusters of its own, one per `decode_tokens_per_cluster` keys (rounded
up). The centroids stay on the device in the sequence's state, each host token's cluster id is its
summary field (int32). A step scores each cluster by the highest q . centroid over the kv-head's query
heads, takes clusters in that order until (budget - device_window - sinks) tokens are covered and
cuts the last one at its newest tokens (the official "truc" selection), plus the sinks.

Defaults (sjtu-zhao-lab/ClusterKV@9579755, accuracy/patch.py and accuracy/cluster_attention.py,
the LongBench setting): budget 1024 tokens, sinks included (--token_budget), 16 sinks (--sink), 400
clusters (--nlist), 20 k-means iterations (--fit_iter), cosine distance (--dist_t), the first two
layers dense (layer_id < 2). Decode tokens: the system code (efficiency/bench_textgen.py,
clusterkv_controller.py) keeps the generated tokens in a window of 320 and, each time it fills,
clusters them into 8 new clusters appended to the prompt's: one cluster per 40 tokens, the default
of `decode_tokens_per_cluster` (a decode block of 16 here makes one cluster).

What differs:
- k-means starts at evenly spaced keys (deterministic) and runs the full 20 iterations (one
  cluster: none; the official RAFT fit starts at random and stops once converged). Keys join the
  cluster of the nearest mean direction (cosine); the centroid a query scores is the cluster's
  mean raw key, so q . centroid is the cluster's mean logit (the official scores RAFT's
  centroids).
- The budget covers the device window too: budget - device_window - sink tokens come from clusters
  (the official: token_budget - sink, every generated token besides).
- GQA: one cluster ranking per kv-head, by the highest of its query heads' q . centroid; the
  official code ranks per query head (gqa_policy None).
- The device window (64 tokens by default) is nanokv's and starts with the prompt's newest tokens:
  the official accuracy code attends every generated token, its system code keeps a window of 320
  generated tokens and clusters them 320 at a time; here a block of 16 is clustered as it leaves
  the window.
- No cache of recalled clusters on the device (the paper's cluster-level cache): a step recalls
  what it reads, so the bytes moved are an upper bound.
- Device-side state: the centroids, [H, C, D] float32 per layer and sequence (C = 400 + one per 16
  decode tokens), sit outside the cache's pool; each step counts the centroids and cluster ids it
  reads in scored_bytes.
- A recompute after preemption re-clusters its prompt and generated tokens together (one batch).
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import Offloader, OffloadView, Picks, ReadStep, scaled_windows


def spherical_kmeans(keys: torch.Tensor, C: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [H, n, D] -> (centroids [H, C, D] float32: the mean key of each cluster; labels [H, n]):
    k-means on the keys' directions (cosine similarity), started at C evenly spaced keys."""
    H, n, D = keys.shape
    if C == 1:  # every key in the one cluster from the start (a decode block's, by default): nothing to iterate
        return keys.float().mean(dim=1, keepdim=True), torch.zeros(H, n, dtype=torch.int64, device=keys.device)
    x = F.normalize(keys.float(), dim=-1)
    directions = x[:, torch.arange(C, device=keys.device) * n // C]            # [H, C, D]
    index = torch.zeros(H, n, D, dtype=torch.int64, device=keys.device)
    for _ in range(iterations):
        labels = torch.einsum("hnd,hcd->hnc", x, directions).argmax(-1)
        sums = torch.zeros(H, C, D, device=keys.device).scatter_add_(1, index.copy_(labels[..., None]), x)
        # an emptied cluster keeps its direction (its sum is 0)
        directions = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1), directions)
    labels = torch.einsum("hnd,hcd->hnc", x, directions).argmax(-1)
    index.copy_(labels[..., None])
    sums = torch.zeros(H, C, D, device=keys.device).scatter_add_(1, index, keys.float())
    sizes = torch.zeros(H, C, device=keys.device).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
    return sums / sizes.clamp(min=1)[..., None], labels


class ClusterKV(Offloader):
    name = "clusterkv"
    description = "recallable clusters: keys k-means-clustered by direction, the clusters nearest the query recalled"
    paper = "https://arxiv.org/abs/2412.03213"
    default_budget = 1024
    options = {
        "skip_layers": (int, 2, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 64, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
        "sink": (int, 16, "an integer >= 0 (the first tokens, always read and never clustered)", lambda v: v >= 0),
        "clusters": (int, 400, "an integer >= 1 (clusters of the prompt's keys per head)", lambda v: v >= 1),
        "decode_tokens_per_cluster": (int, 40, "an integer >= 1 (keys per new cluster of a later batch)",
                                      lambda v: v >= 1),
        "iterations": (int, 20, "an integer >= 1 (k-means iterations)", lambda v: v >= 1),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        # a budget under the official 1024 keeps the official shares of window and sinks
        options = scaled_windows(options, budget, self.default_budget, {"device_window": 64, "sink": 16})
        super().__init__(compression, budget, **options)

    def check_budget(self):
        if self.budget <= self.device_window + self.sink:
            raise ValueError(f"clusterkv's budget={self.budget} must exceed device_window + sink = "
                             f"{self.device_window} + {self.sink}: give a larger budget or smaller windows")

    def summary_fields(self, head_dim: int) -> dict:
        return {"cluster": (torch.int32, ())}

    def summarize(self, view: OffloadView) -> dict[str, torch.Tensor]:
        H, n, _ = view.keys.shape
        centroids = view.state.setdefault("centroids", {})                 # layer -> [H, C, D]
        held = centroids.get(view.layer)
        clustered = view.positions >= self.sink                              # sinks keep cluster -1
        ids = torch.full((H, n), -1, dtype=torch.int32, device=view.keys.device)
        m = int(clustered.sum())
        if m:
            C = min(self.clusters, m) if held is None else math.ceil(m / self.decode_tokens_per_cluster)
            new, labels = spherical_kmeans(view.keys[:, clustered], C, self.iterations)
            first = 0 if held is None else held.shape[1]
            ids[:, clustered] = (labels + first).to(torch.int32)
            centroids[view.layer] = new if held is None else torch.cat([held, new], dim=1)
        return {"cluster": ids}

    def pick(self, step: ReadStep) -> Picks:
        ids = step.summary("cluster").long()                                 # [b, H, S]
        b, H, S = ids.shape
        D = step.queries.shape[-1]
        device = ids.device
        held = step.held()
        own = [state.get("centroids", {}).get(step.layer) for state in step.states]
        C = max([1] + [c.shape[1] for c in own if c is not None])
        centroids = torch.zeros(b, H, C, D, device=device)
        for i, c in enumerate(own):
            if c is not None:
                centroids[i, :, :c.shape[1]] = c
        q = step.queries.float().view(b, H, -1, D)
        scores = torch.einsum("bhgd,bhcd->bhgc", q, centroids).amax(dim=2)  # [b, H, C]
        clustered = held & (ids >= 0)
        sizes = torch.zeros(b, H, C, dtype=torch.int64, device=device).scatter_add_(2, ids.clamp(min=0),
                                                                                    clustered.long())
        scores = scores.masked_fill(sizes == 0, float("-inf"))
        # each cluster's rank (0: nearest the query); a slot sorts by its cluster's rank, then by age
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(2, order, torch.arange(C, device=device).expand_as(order))
        slot = torch.arange(S, device=device)
        key = rank.gather(2, ids.clamp(min=0)) * S + slot
        key = key.masked_fill(~clustered, C * S)
        sinks = min(self.sink, S)
        k = min(S, max(0, self.budget - self.device_window - self.sink))
        top = key.topk(k, dim=-1, largest=False)
        picked = top.indices.masked_fill(top.values == C * S, -1)
        first = slot[:sinks].expand(b, H, sinks).masked_fill(~(held & (ids < 0))[..., :sinks], -1)
        centroid_bytes = sum(c.numel() * c.element_size() for c in own if c is not None)
        # read: an int32 cluster id per host token, and the centroids
        return Picks(slots=torch.cat([first, picked], dim=-1), scored_bytes=held.sum() * 4 + centroid_bytes)
