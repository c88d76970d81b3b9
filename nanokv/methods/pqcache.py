"""pqcache: keep every token, most of them in host memory, and recall the top tokens by product-quantized keys.

Paper: PQCache: Product Quantization-based KVCache for Long Context LLM Inference (Hailin Zhang,
Xiaodong Ji, Yilin Chen, Fangcheng Fu, Xupeng Miao, Xiaonan Nie, Weipeng Chen, Bin Cui; SIGMOD
2025), arXiv 2407.12820; code HugoZHL/PQCache. Finding the keys a query attends to is a maximum
inner-product search, which the database world answers with product quantization: split each key
into m sub-vectors, quantize each against a codebook of 2^bits centroids learned by k-means, and
keep only the codes. A query then scores every key from a small table, sum over the sub-spaces of
q_j . centroid_j[code_j], and only the top-k keys' full K and V are fetched from the CPU.
Here, per kv-head of each layer from `skip_layers` on: the newest `device_window` tokens (the
paper's local window) stay on the device and are always read; the older ones move to the host
tier. When a layer's first tokens move (the prompt), `summarize` learns its codebooks by k-means
(Euclidean) on their keys, the sinks left out; every moved token, that batch's and each later
decode block's, is coded by its nearest centroids. Codebooks [H, m, 2^bits, D / m] stay on the
device in the sequence's state; the codes (uint8, m per token) are the summary field. A step
turns each query head's lookup scores into a softmax over the host tokens (scale 1 / sqrt(D)),
sums it over the kv-head's query heads (the official GQA rule), and recalls the top
(budget - device_window - sink) host tokens, plus the first `sink` tokens, always read.

Defaults (HugoZHL/PQCache@0b74e12, run_mistral.sh and vq_method/retrieval_based/pq_search.py):
m = 2 sub-vectors per head (SUBVEC), 6 bits, so 64 centroids per sub-space (SUBBITS), Euclidean
k-means (METRIC=euc), 32 sinks (SINK_SIZE), the GQA rule above (GQA=True), recent and top-k halves
of the tokens read (RECENT_RATIO=0.5: device_window = budget / 2); every layer searched
(skip_layers 0). The official budget is a fifth of the context (COMPRESS=0.2); nanokv's is tokens,
1024 by default (≈, a fifth of a 5K context). k-means iterations: the official MAX_ITER=0 runs as
many as the GPU's time on a layer hides, 3 to 300 (multi_core_compressor_v2.py); we fix 10 (≈).

What differs:
- k-means runs on the device, started at evenly spaced keys, for a fixed number of iterations
  (the official: scikit-learn on CPU cores, overlapped with the prefill). It learns from the keys
  that move to the host (the prompt but its sinks and the device window); the official, from the
  prompt but its sinks.
- A prompt of no more host tokens than centroids gets one centroid per key (exact scores); the
  official code then skips PQ and attends densely.
- No block-level GPU cache of fetched tokens: a step recalls what it reads (bytes moved: an upper
  bound).
- Device-side state: the codebooks, H * 2^bits * D float32 per layer and sequence, sit outside the
  cache's pool; each step counts them and the codes it reads in scored_bytes.
- Ties: tokens with the same codes score exactly the same; the oldest of them are taken first.
- A recompute after preemption learns the codebooks again from its prompt and generated tokens.
"""

import math

import torch

from nanokv.methods.base import Offloader, OffloadView, Picks, ReadStep, scaled_windows


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x [G, n, d], centroids [G, K, d] -> [G, n] each row's nearest centroid (Euclidean)."""
    return (torch.einsum("gnd,gkd->gnk", x, centroids) - centroids.square().sum(-1)[:, None] / 2).argmax(-1)


def kmeans(x: torch.Tensor, K: int, iterations: int) -> torch.Tensor:
    """x [G, n, d] float32 -> centroids [G, K, d]: Lloyd's k-means per group, started at K evenly
    spaced rows; an emptied cluster keeps its centroid."""
    G, n, d = x.shape
    centroids = x[:, torch.arange(K, device=x.device) * n // K]
    for _ in range(iterations):
        labels = nearest(x, centroids)
        sums = torch.zeros(G, K, d, device=x.device).scatter_add_(1, labels[..., None].expand(-1, -1, d), x)
        sizes = torch.zeros(G, K, device=x.device).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
        centroids = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], centroids)
    return centroids


class PQCache(Offloader):
    name = "pqcache"
    description = "offloaded KV searched by product-quantized keys: the top tokens by PQ scores recalled"
    paper = "https://arxiv.org/abs/2407.12820"
    default_budget = 1024
    options = {
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 512, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
        "sink": (int, 32, "an integer >= 0 (the first tokens, always read)", lambda v: v >= 0),
        "subspaces": (int, 2, "an integer >= 1 dividing the head dimension (PQ's m)", lambda v: v >= 1),
        "bits": (int, 6, "an integer in 1..8 (2^bits centroids per sub-space, one uint8 code)",
                 lambda v: 1 <= v <= 8),
        "iterations": (int, 10, "an integer >= 1 (k-means iterations)", lambda v: v >= 1),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        # a budget under 1024 keeps the official shares: half local window, 32 sinks per 1024
        options = scaled_windows(options, budget, self.default_budget, {"device_window": 512, "sink": 32})
        super().__init__(compression, budget, **options)

    def check_budget(self):
        if self.budget <= self.device_window + self.sink:
            raise ValueError(f"pqcache's budget={self.budget} must exceed device_window + sink = "
                             f"{self.device_window} + {self.sink}: give a larger budget or smaller windows")

    def summary_fields(self, head_dim: int) -> dict:
        if head_dim % self.subspaces:
            raise ValueError(f"pqcache's subspaces={self.subspaces} must divide the head dimension {head_dim}")
        return {"codes": (torch.uint8, (self.subspaces,))}

    def summarize(self, view: OffloadView) -> dict[str, torch.Tensor]:
        H, n, D = view.keys.shape
        m = self.subspaces
        x = view.keys.float().view(H, n, m, D // m).transpose(1, 2).reshape(H * m, n, D // m)
        books = view.state.setdefault("codebooks", {})                       # layer -> [H * m, K, D / m]
        if view.layer not in books:
            train = x[:, view.positions >= self.sink]                         # sinks are always read: no codes needed
            if train.shape[1] == 0:  # only sinks so far: the first batch past them learns the codebooks
                return {"codes": torch.zeros(H, n, m, dtype=torch.uint8, device=x.device)}
            books[view.layer] = kmeans(train, min(2 ** self.bits, train.shape[1]), self.iterations)
        codes = nearest(x, books[view.layer])                                 # [H * m, n]
        return {"codes": codes.view(H, m, n).transpose(1, 2).to(torch.uint8)}

    def pick(self, step: ReadStep) -> Picks:
        codes = step.summary("codes").long()                                 # [b, H, S, m]
        b, H, S, m = codes.shape
        D = step.queries.shape[-1]
        device = codes.device
        held = step.held()
        own = [state.get("codebooks", {}).get(step.layer) for state in step.states]
        K = max([1] + [c.shape[1] for c in own if c is not None])
        books = torch.zeros(b, H, m, K, D // m, device=device)
        for i, c in enumerate(own):
            if c is not None:
                books[i, :, :, :c.shape[1]] = c.view(H, m, -1, D // m)
        q = step.queries.float().view(b, H, -1, m, D // m)                  # [b, H, g, m, D / m]
        table = torch.einsum("bhgmd,bhmkd->bhgmk", q, books)                 # q_j . centroid_j
        g = q.shape[2]
        approx = table.gather(-1, codes.transpose(2, 3)[:, :, None].expand(b, H, g, m, S)).sum(3)  # [b, H, g, S]
        slot = torch.arange(S, device=device)
        candidate = held & (slot >= self.sink)
        probs = (approx / math.sqrt(D)).masked_fill(~candidate[:, :, None], float("-inf")).softmax(-1)
        scores = probs.sum(2).masked_fill(~candidate, float("-inf"))        # a head with no candidate: nan -> -inf
        k = max(0, self.budget - self.device_window - self.sink)
        # tokens of the same codes score the same: of equal scores, the oldest first (a stable sort),
        # so the pick does not depend on how topk breaks ties
        top = scores.argsort(dim=-1, descending=True, stable=True)[..., :k]
        picked = top.masked_fill(scores.gather(-1, top) == float("-inf"), -1)
        sinks = min(self.sink, S)
        first = slot[:sinks].expand(b, H, sinks).masked_fill(~held[..., :sinks], -1)
        book_bytes = sum(c.numel() * c.element_size() for c in own if c is not None)
        # read: m one-byte codes per host token, and the codebooks
        return Picks(slots=torch.cat([first, picked], dim=-1), scored_bytes=held.sum() * m + book_bytes)
