"""retrievalattention: an attention-aware graph over the host keys, searched from each decode query.

Paper: RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval (Liu, Chen,
Lu, Jiang, Han, Zhang, Chen, Zhang, Ding, Zhang, Chen, Yang, Yang, Qiu; 2024), arXiv 2409.10516;
code microsoft/RetrievalAttention. Attention is sparse, so a decode step needs only the keys of
largest q . k: a nearest-neighbour search. But queries and keys come from different distributions,
and an index built from keys alone must scan a third of them to find a query's neighbours. So the
index is built with the prefill's queries (RoarGraph): each prompt query's nearest keys are linked
to each other, and a later query, which looks like the prompt's queries, walks those links to its
own nearest keys. KV lives in CPU memory; the CPU searches the index and attends over what it
finds, and the GPU attends over the static tokens (initial and recent), merged by their LSE.
In nanokv, per kv-head of layers from `skip_layers` on: the newest `device_window` tokens stay on the
device; the older ones move to the host, and as they move `summarize` grows a graph over the host
slots in the sequence's state (host memory): each moving token's query (its group's query heads)
finds its `degree` nearest moving keys by q . k, and the nearest is linked both ways with each of
the others; each key keeps its `degree` most-often linked neighbours. Consecutive slots are always
linked too (a chain), so every key stays reachable. Blocks moved at decode have no queries: their
own keys stand in for them. A decode step runs a beam search from the key most linked to: expand
every unexpanded key among the `beam` best seen, score their neighbours by q . k (the highest over
the group's query heads) on the host keys, until the beam's keys are all expanded; it recalls the
first `sinks` host slots and the best budget - device_window - sinks keys found. The engine
attends over them and the device window in one softmax (the LSE merge, done exactly).
Defaults (≈, to re-check: the paper's evaluation setup as we recall it, not re-read here; the
official repository microsoft/RetrievalAttention now holds its successor RetroInfer): 128 initial
+ 512 recent static tokens and 100 retrieved keys per head (so budget 740), every layer retrieving
(skip_layers 0); degree 16 and beam 128 are nanokv's (≈ RoarGraph's out-degree and search list).

What differs:
- The index is a small graph in torch (chain + query-projected links), not RoarGraph's pruned
  projection nor the paper's CPU kernels; the search reads the host keys in host memory and
  scored_bytes counts the keys it visits (host memory, not the device's).
- Decode blocks join the graph by their own keys and the chain (the paper leaves generated tokens
  in the GPU window).
- GQA: one search per kv-head, scored by the best of its query heads (the paper searches per head).
- The initial tokens are recalled each step (the paper keeps them on the GPU).
"""

import torch

from nanokv.cache.pool import HOST
from nanokv.methods.base import Offloader, Picks, scaled_windows, slot_mask


def linked_neighbours(keys: torch.Tensor, queries: torch.Tensor, degree: int) -> torch.Tensor:
    """keys [m, D], queries [r, D] -> [m, degree] each key's neighbours (-1: none): the keys linked
    most often when every query's `degree` nearest keys by q . k link the nearest with the others
    (both ways); ties by slot."""
    m = keys.shape[0]
    t = min(degree, m)
    knn = (queries.float() @ keys.float().T).topk(t, dim=-1).indices                  # [r, t]
    first, rest = knn[:, :1].expand(-1, t - 1).flatten(), knn[:, 1:].flatten()
    src, dst = torch.cat([first, rest]), torch.cat([rest, first])
    edges, counts = torch.unique(src * m + dst, return_counts=True)
    src, dst = edges // m, edges % m
    top = int(counts.max()) + 1 if len(counts) else 1
    order = ((src * top + (top - 1 - counts)) * m + dst).argsort()                    # by key, most links first
    src, dst = src[order], dst[order]
    rank = torch.arange(len(src), device=src.device) - torch.searchsorted(src, src)
    keep = rank < degree
    out = torch.full((m, degree), -1, dtype=torch.int64, device=keys.device)
    out[src[keep], rank[keep]] = dst[keep]
    return out


def beam_search(neighbours: torch.Tensor, keys: torch.Tensor, q: torch.Tensor, entry: torch.Tensor, beam: int,
                lengths: torch.Tensor):
    """P greedy beam searches at once (one per kv-head of each sequence), each over its graph
    neighbours [P, n, W] (-1: none; plus the chain i - 1, i + 1) of its first `lengths` [P] keys
    [P, n, D], for its query heads q [P, g, D] (score: the highest q . k) from slot entry [P] ->
    (scores [P, n], -inf where not visited; keys visited [P]). Each round expands every unexpanded
    key among a search's `beam` best seen and scores only the neighbours not seen yet."""
    P, n = keys.shape[:2]
    score = torch.full((P, n), float("-inf"), device=keys.device)
    visited = torch.zeros(P, n, dtype=torch.bool, device=keys.device)
    expanded = torch.zeros(P, n, dtype=torch.bool, device=keys.device)
    fresh = torch.zeros(P, n, dtype=torch.bool, device=keys.device)
    fresh.scatter_(1, entry.clamp(0, n - 1)[:, None], (lengths > 0)[:, None])
    flat_keys, q = keys.flatten(0, 1), q.float()
    while True:
        at = fresh.flatten().nonzero().squeeze(1)                                     # p * n + slot
        if len(at) == 0:
            break
        visited |= fresh
        scores = torch.einsum("fd,fgd->fg", flat_keys.index_select(0, at).float(), q.index_select(0, at // n))
        score.view(-1)[at] = scores.amax(dim=-1)
        best = score.topk(min(beam, n), dim=-1, sorted=False).indices                 # [P, beam], a set
        seen = visited.gather(1, best)
        opened = seen & ~expanded.gather(1, best)
        expanded.scatter_(1, best, seen)  # an unvisited key among the best stays unexpanded
        links = neighbours.gather(1, best[..., None].expand(-1, -1, neighbours.shape[-1]))
        near = torch.cat([links, best[..., None] - 1, best[..., None] + 1], dim=-1)
        near = torch.where(opened[..., None] & (near < lengths[:, None, None]), near, -1).flatten(1)
        fresh = slot_mask(near, n) & ~visited
    return score, visited.sum(dim=1)


class RetrievalAttention(Offloader):
    name = "retrievalattention"
    description = "an attention-aware graph over host keys (prefill queries link them), beam-searched each step"
    paper = "https://arxiv.org/abs/2409.10516"
    default_budget = 740
    options = {
        "sinks": (int, 128, "an integer >= 0 (the oldest tokens, always read)", lambda v: v >= 0),
        "degree": (int, 16, "an integer >= 2 (graph links per key, and nearest keys per prefill query)",
                   lambda v: v >= 2),
        "beam": (int, 128, "an integer >= 1 (the search's beam: best keys kept while expanding)", lambda v: v >= 1),
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 512, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        # a budget under 740 keeps the official shares of sinks and local window (128 and 512 of 740)
        options = scaled_windows(options, budget, self.default_budget, {"device_window": 512, "sinks": 128})
        super().__init__(compression, budget, **options)

    def check_budget(self):
        if self.budget <= self.device_window + self.sinks:
            raise ValueError(f"budget={self.budget} of method 'retrievalattention' must exceed device_window + sinks "
                             f"= {self.device_window + self.sinks} (it reads budget - device_window - sinks "
                             f"retrieved keys per head)")

    def summarize(self, view):
        """Grow the layer's graph with the moving keys: linked by their own queries (a prefill's) or keys."""
        index = view.state.setdefault("retrievalattention", {}).setdefault(view.layer, [])
        keys = view.keys.to(HOST).float()                                             # [H, m, D]
        H, m, D = keys.shape
        if view.queries is not None:
            queries = view.queries.to(HOST).float().view(m, H, -1, D).transpose(0, 1).flatten(1, 2)  # [H, m g, D]
        else:
            queries = keys
        offset = sum(len(part[0]) for part in index)
        linked = [linked_neighbours(keys[h], queries[h], self.degree) for h in range(H)]
        index.append([torch.where(nb >= 0, nb + offset, -1) for nb in linked])
        return {}

    def graph(self, state: dict, layer: int, h: int) -> torch.Tensor:
        """[n, degree] kv-head h's neighbours over all its host slots."""
        return torch.cat([part[h] for part in state["retrievalattention"][layer]])

    def state_bytes(self, state: dict) -> int:
        """None of the device's: the graph lives in host memory, beside the keys it indexes."""
        return 0

    def pick(self, step) -> Picks:
        b, H = step.lengths.shape
        D = step.queries.shape[-1]
        k = self.budget - self.device_window - self.sinks
        lengths = step.lengths.to(HOST).flatten()                                     # [P = b H]
        n = max(int(lengths.max()), 1)
        keys = step.keys.to(HOST).flatten(0, 1)[:, :n]                               # [P, n, D] host memory
        q = step.queries.to(HOST).float().view(b * H, -1, D)
        # every head's graph, padded to n with no links; the search starts at the key most linked to
        neighbours = torch.full((b * H, n, self.degree), -1, dtype=torch.int64, device=HOST)
        entry = torch.zeros(b * H, dtype=torch.int64, device=HOST)
        for p, held in enumerate(lengths.tolist()):
            if held > 0:  # a sequence that moved nothing yet has no graph
                graph = self.graph(step.states[p // H], step.layer, p % H)[:held]
                neighbours[p, :len(graph)] = graph
                # counted per head: masks and counts over the whole padded [P, n, W] took a third of a step
                entry[p] = torch.bincount(graph[(graph >= 0) & (graph < held)], minlength=held).argmax()
        score, visited = beam_search(neighbours, keys, q, entry, max(self.beam, k), lengths)
        slot = torch.arange(self.sinks, device=HOST)
        sinks = torch.where(slot < lengths[:, None], slot, -1)                       # [P, sinks]
        score[:, :self.sinks] = float("-inf")
        top = score.topk(min(k, n), dim=-1)
        found = torch.where(top.values > float("-inf"), top.indices, -1)             # best first, -1 after
        picks = torch.nn.functional.pad(torch.cat([sinks, found], dim=1), (0, k - found.shape[1]), value=-1)
        return Picks(slots=picks.view(b, H, -1).to(step.lengths.device),
                     scored_bytes=int(visited.sum()) * D * step.itemsize)
