"""squeezed_attention: cluster the fixed context's keys; each decode step reads the clusters whose
estimated attention passes a calibrated threshold, and everything after the context.

Paper: Squeezed Attention: Accelerating Long Context Length LLM Inference (Hooper, Kim et al., UC
Berkeley; ACL 2025), arXiv 2411.09688. Much of a long prompt is a fixed context (a document, a code
base) that many user inputs share, so it can be worked on ahead of time:
1. offline, per layer and head, the fixed context's keys are grouped by k-means on their directions
   (cosine: the keys L2-normalized) into C = `clusters` x its length centroids; a centroid is the
   plain mean of its cluster's keys. The context's newest `window` tokens are not clustered;
2. online, a query q estimates the attention each key of cluster i draws by its centroid:
   S_i = exp(q . C_i / sqrt(D)) / sum_j N_j exp(q . C_j / sqrt(D))   (N_j: cluster j's size),
   and only the keys of clusters with S_i above a threshold T are attended, exactly, together with
   the window and everything after the fixed context, which are always read;
3. T is one global number calibrated offline for a target sparsity (the official
   run_global_threshold): the `sparsity` quantile of S over every key of every layer and head, S
   averaged over sample queries, the context's own last `window` tokens (so they are left out of
   the clusters, and always read).
The paper also looks clusters up hierarchically (coarse centroids of the fine ones, each level with
its own threshold) to make the lookup sublinear: a speed device, left out here (one level).

Here: the fixed context is what the engine compresses, the prompt or the context before a question
(LLM.generate's (context, question) prompts). nanokv keeps no prefix store to cluster it truly
offline, so a head's clusters are made at the sequence's first decode step, per layer, from the keys
the cache holds (ReadStep.keys), and kept in the sequence's reader state (centroids, assignment,
sizes). A preemption's recompute starts that state afresh and clusters the same keys again: the
k-means is deterministic (started at evenly spaced keys, Lloyd's steps until no key moves, at most
ITERATIONS; sums by matrix products, not atomics), so it finds the same clusters. What the
paper calibrates offline, T, comes from `python -m nanokv.calibrate squeezed_attention`
(nanokv/calibrate/squeezed_attention.py): the quantiles 0, 0.01, .., 1 of S over calibration text,
each text's last `window` tokens as the sample queries; `sparsity` picks (interpolates) one.

Budget (Quest's convention): `budget` = tokens a head reads per decode step (default 1024). The
window and what follows the fixed context are always read; the clusters fill the rest, whole, in
order of S, the first one below T or that no longer fits ending the pick. So T decides while the
budget is roomy and the budget caps a step's read (but never what is always read). sparsity=0 sets
no threshold and needs no calibration: the budget alone decides.

Defaults, from the official code (SqueezeAILab/SqueezedAttention), read in a fork of it
(Duc-Haui/SqueezedAttention @ 889d298: offline_clustering.py, squeezedattention/clustering.py,
LongBench/pred.py, transformers/.../modeling_llama.py): window=100 (`--observation_window` and
`--obs_window` default 100); clusters=0.05 (the paper's 5% of the context; the centroid count is
int(percent x (context - window)), at least 1); sparsity=0.7 (the smallest of the percentiles
0.7, 0.8, 0.9 the fork's run scripts sweep; pred.py's own default is 0.5: not checked against the
paper's tables); every layer (skip_layers=0: the lookup runs in each layer's attention).

What differs:
- the clusters are made at the first decode step (no offline prefix store) and their one read of
  the context's keys is counted then (scored_bytes); Lloyd's further passes over them are not;
  each later step counts the centroids' bytes (C x D per head, in the cache's dtype);
- k-means: evenly spaced starts and at most ITERATIONS Lloyd steps, not cuML's k-means++ (seed 0,
  up to 150 iterations);
- GQA: the cache stores kv-heads, so clusters are per kv-head and a kv-head's S_i is the mean over
  its query heads, as the official lookup averages S over the several queries of a user input;
- the official threshold is calibrated on each fixed context itself; here on calibration text,
  once per model (`per_layer=true`: each layer's own quantile instead of the global one);
- the budget: the paper reads whatever passes T; here the clusters also stop at the budget;
- one-level lookup only (no hierarchical centroids).
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import CALIBRATION_FILE, PageReader, Picks, ReadStep, top_slots

ITERATIONS = 50          # Lloyd steps at most (they stop earlier once no key changes cluster)
CHUNK = 1 << 22          # key-centroid products per piece: bounds k-means' memory on long contexts
GRID = 100               # the artifact's thresholds: quantiles 0, 1 / GRID, .., 1


def cluster_count(n: int, clusters: float) -> int:
    """Centroids for n clustered keys: int(clusters x n), at least 1 (none for no keys)."""
    return 0 if n == 0 else max(1, int(clusters * n))


def _pieces(n: int, width: int):
    rows = max(1, CHUNK // max(1, width))
    return (slice(s, min(s + rows, n)) for s in range(0, n, rows))


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x [H, n, D], centroids [H, C, D] -> [H, n] the nearest centroid of each row (Euclidean)."""
    half_norm = centroids.square().sum(-1)[:, None] / 2
    return torch.cat([(torch.einsum("hnd,hcd->hnc", x[:, part], centroids) - half_norm).argmax(-1)
                      for part in _pieces(x.shape[1], x.shape[0] * centroids.shape[1])], dim=1)


def _sums(x: torch.Tensor, labels: torch.Tensor, C: int) -> torch.Tensor:
    """x [H, n, D] summed per cluster -> [H, C, D], by one-hot products (the same sums on every run,
    where a scatter-add's order, and so its rounding, may vary on a GPU)."""
    out = torch.zeros(x.shape[0], C, x.shape[2], dtype=x.dtype, device=x.device)
    for part in _pieces(x.shape[1], x.shape[0] * C):
        out += torch.einsum("hnc,hnd->hcd", F.one_hot(labels[:, part], C).to(x.dtype), x[:, part])
    return out


def kmeans(keys: torch.Tensor, C: int):
    """keys [H, n, D] -> (centroids [H, C, D] float32, the mean key of each cluster; labels [H, n];
    sizes [H, C]): k-means of the keys' directions, started at C evenly spaced keys."""
    x = F.normalize(keys.float(), dim=-1)
    n = x.shape[1]
    centroids = x[:, torch.arange(C, device=x.device) * n // C]
    labels = None
    for _ in range(ITERATIONS):
        new = _nearest(x, centroids)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sizes = F.one_hot(labels, C).sum(1)
        centroids = torch.where(sizes[..., None] > 0, _sums(x, labels, C) / sizes.clamp(min=1)[..., None], centroids)
    sizes = F.one_hot(labels, C).sum(1)
    return _sums(keys.float(), labels, C) / sizes.clamp(min=1)[..., None], labels, sizes


def cluster_estimates(queries: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """queries [B, H, g, D] (a kv-head's query heads), centroids [B, H, C, D], sizes [B, H, C] ->
    [B, H, C] float32: S_i = exp(q . C_i / sqrt(D)) / sum_j N_j exp(q . C_j / sqrt(D)), the attention
    one key of cluster i is estimated to draw, averaged over the g query heads; -inf for an empty
    cluster."""
    logits = torch.einsum("bhgd,bhcd->bhgc", queries.float(), centroids.float()) / math.sqrt(queries.shape[-1])
    log_sizes = sizes.float().log()[:, :, None]
    est = (logits - (logits + log_sizes).logsumexp(-1, keepdim=True)).exp().mean(2)
    return est.masked_fill(sizes == 0, float("-inf"))


class SqueezedAttention(PageReader):
    name = "squeezed_attention"
    description = ("query-aware sparse decode: k-means clusters of the context's keys; read the clusters whose "
                   "centroid estimate passes a calibrated threshold (cache kept whole)")
    paper = "https://arxiv.org/abs/2411.09688"
    default_budget = 1024
    calibration = "squeezed_attention"
    options = {
        "sparsity": (float, 0.7, "a number in [0, 0.99]: the calibrated share of the context's keys left "
                                 "unread (0: no threshold, the budget alone decides)", lambda v: 0 <= v <= 0.99),
        "clusters": (float, 0.05, "a number in (0, 1]: centroids per clustered key", lambda v: 0 < v <= 1),
        "window": (int, 100, "an integer >= 0: the context's newest tokens, always read", lambda v: v >= 0),
        "per_layer": (bool, False, "true or false", lambda v: True),
        "skip_layers": (int, 0, "an integer >= 0", lambda v: v >= 0),
        "calibration_file": CALIBRATION_FILE,
    }
    thresholds: torch.Tensor | None = None        # [GRID + 1] the global quantiles of S (bind_calibration)
    layer_thresholds: torch.Tensor | None = None  # [L, GRID + 1] each layer's

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        if self.sparsity == 0:
            self.calibration = None  # no threshold to look up

    def bind_calibration(self, artifact: dict):
        self.thresholds = torch.tensor(artifact["thresholds"], dtype=torch.float64, device="cpu")
        self.layer_thresholds = torch.tensor(artifact["layer_thresholds"], dtype=torch.float64, device="cpu")

    def threshold(self, layer: int) -> float:
        """T for this layer: the calibrated quantile `sparsity` of S (-inf: none)."""
        if self.sparsity == 0:
            return float("-inf")
        if self.thresholds is None:
            raise ValueError(f"method {self.name!r} has no calibration: bind_calibration first "
                             f"(LLM does; make one with python -m nanokv.calibrate {self.calibration})")
        grid = self.layer_thresholds[layer] if self.per_layer else self.thresholds
        at = self.sparsity * GRID
        low = min(int(at), GRID - 1)
        return float(grid[low] + (at - low) * (grid[low + 1] - grid[low]))

    def cluster(self, keys: torch.Tensor):
        """Each kv-head's context keys [H, n, D] -> what the sequence keeps for the layer: centroids
        (in the keys' dtype, as they would be stored), assignment and sizes; None for no keys."""
        C = cluster_count(keys.shape[1], self.clusters)
        if not C:
            return None
        centroids, labels, sizes = kmeans(keys, C)
        return centroids.to(keys.dtype), labels, sizes

    def pick(self, step: ReadStep) -> Picks:
        (b, H), S, D = step.lengths.shape, step.slots, step.queries.shape[-1]
        device = step.lengths.device  # the keys are read only at the step that clusters them
        if step.compress_lens is None:
            raise ValueError(f"{self.name} needs each sequence's context length (ReadStep.compress_lens)")
        fixed = [max(0, n - self.window) for n in step.compress_lens]     # the clustered keys
        scored, found = 0, []
        for i, n in enumerate(fixed):
            if step.layer not in step.states[i]:  # the sequence's first decode step (or its recompute's)
                step.states[i][step.layer] = self.cluster(step.keys[i, :, :n])
                scored += H * n * D * step.itemsize                        # the context's keys, read once
            found.append(step.states[i][step.layer])
        C = max([1] + [c[0].shape[1] for c in found if c is not None])
        centroids = torch.zeros(b, H, C, D, dtype=step.queries.dtype, device=device)
        sizes = torch.zeros(b, H, C, dtype=torch.long, device=device)
        labels = torch.full((b, H, S), C, dtype=torch.long, device=device)  # cluster C: always read
        for i, c in enumerate(found):
            if c is not None:
                count = c[0].shape[1]
                centroids[i, :, :count], labels[i, :, :fixed[i]], sizes[i, :, :count] = c
                scored += H * count * D * step.itemsize                    # the centroids, every step
        est = cluster_estimates(step.queries.view(b, H, -1, D), centroids, sizes)
        order = est.argsort(dim=-1, descending=True, stable=True)
        always = step.lengths - torch.tensor(fixed, device=device)[:, None]  # window + what follows
        room = (self.budget - always).clamp(min=0)
        ranked = (est.gather(-1, order) > self.threshold(step.layer)) & \
            (sizes.gather(-1, order).cumsum(-1) <= room[..., None])
        kept = torch.ones(b, H, C + 1, dtype=torch.bool, device=device)
        kept[..., :C] = torch.zeros_like(ranked).scatter(-1, order, ranked)
        read = kept.gather(-1, labels) & step.held()
        slots = torch.arange(S, dtype=torch.float32, device=device).expand(b, H, S)
        k = min(S, max(self.budget, S - min(fixed)))  # what a head can read: its budget, or more if always-read
        return Picks(slots=top_slots(slots.masked_fill(~read, float("-inf")), k), scored_bytes=scored)
