"""minference: each head's prompt attention follows its own sparse pattern, calibrated offline.

Paper: MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention
(Jiang et al., NeurIPS 2024), arXiv 2407.02490; code microsoft/MInference. Long-context attention
maps fall into three shapes: A-shape (the first tokens and a local window), Vertical-Slash (some
key columns and some diagonals) and Block-Sparse (scattered blocks). An offline, kernel-aware
search assigns each head the pattern that keeps the most attention under one FLOPs target, on one
sample; online, each head builds its pattern's indices from the prompt itself: vertical columns
and slash diagonals from the last 64 queries' attention, blocks from mean-pooled queries and keys.
Then only those parts of the attention are computed. The KV cache is not compressed.

Here `python -m nanokv.calibrate minference --model NAME` (nanokv/calibrate/minference.py) picks
each (layer, query head)'s pattern, and at each layer of a prompt this method turns the pattern
into the tiles (tile_size x tile_size) each query head computes, for a budget of key tokens per
query row:
- A-shape: key tiles holding one of the first budget / 5 tokens, or within budget - budget / 5
  tokens of the query (the sinks and the local window);
- Vertical-Slash: the same counts, chosen: the budget / 5 key columns and the budget - budget / 5
  diagonals (query - key offsets) that drew the most of the last `last_q` queries' softmax
  attention (the first 30 columns and nearest 30 diagonals always, as the official code), each
  rounded out to the tiles it crosses;
- Block-Sparse: the budget / tile_size key tiles of highest mean-pooled q . k per query tile.
The diagonal tile is always computed. `pattern` forces one of them on every head (no calibration).

Defaults: last_q 64 (official minference_forward.py `last_q = 64`), tile_size 64 (the official
kernels' blocks), budget 5120 keys per query row (≈: the paper's FLOPs target, an A-shape of 1k
sinks and a 4k window, §4), the 1 : 4 split of sinks (columns) to window (diagonals) from that
A-shape; the search reads one sample (the paper: one sample from KV retrieval, §3.2 ≈).

What differs:
- Vertical columns and slash diagonals are rounded out to whole tiles (the official
  vertical-slash kernel computes chosen columns token by token and diagonals in 64-wide blocks):
  more pairs than the official kernel, never fewer.
- One budget sets every pattern's size in the proportions above (the official search tries a few
  sizes per pattern: A-shape (100, 800), vertical-slash (30, 800) .. (1000, 4096), block-sparse
  top-100 blocks, minference_forward.py search_pattern); the calibration picks the pattern alone,
  by attention recall at a budget of a quarter of the sample (nanokv/calibrate/minference.py).
- Block-sparse keeps budget / tile_size blocks per query tile (official: top-100 blocks of 64).
- Only a prompt the sequence holds alone is sparse: a recompute's generated tokens, and layers
  with a sliding window, attend densely (methods/base.py: SparsePrefill).
"""

import torch

from nanokv.methods.base import CALIBRATION_FILE, SparsePrefill, SparsePrefillView

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")  # the artifact's pattern ids, in this order


class MInference(SparsePrefill):
    name = "minference"
    description = "sparse prefill: each head's calibrated A-shape, vertical-slash or block-sparse tiles"
    paper = "https://arxiv.org/abs/2407.02490"
    calibration = "minference"
    default_budget = 5120
    options = {
        "pattern": (str, "calibrated", f"calibrated or one of {', '.join(PATTERNS)} (every head)",
                    lambda v: v == "calibrated" or v in PATTERNS),
        "last_q": (int, 64, "an integer >= 1 (the last queries that estimate vertical and slash lines)",
                   lambda v: v >= 1),
        "tile_size": (int, 64, "a power of two >= 1 (the tile: query and key tokens)",
                       lambda v: v > 0 and v & (v - 1) == 0),
        "calibration_file": CALIBRATION_FILE,
    }
    patterns: torch.Tensor | None = None  # [L, Hq] pattern ids from bind_calibration
    forced = 30  # the first columns and nearest diagonals a vertical-slash head always keeps (official)

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        if self.pattern != "calibrated":
            self.calibration = None  # one pattern for every head: nothing to load

    def check_budget(self):
        if self.budget is not None and self.budget < 5:
            raise ValueError(f"minference's budget {self.budget} leaves no room for sinks and a window: give --budget "
                             f">= 5 (key tokens per query row)")

    def bind_calibration(self, artifact: dict):
        self.patterns = torch.tensor(artifact["patterns"], dtype=torch.long, device="cpu")

    def head_patterns(self, layer: int, query_heads: int, device) -> torch.Tensor:
        """[Hq] the pattern id of each query head at `layer`."""
        if self.pattern != "calibrated":
            return torch.full((query_heads,), PATTERNS.index(self.pattern), device=device)
        if self.patterns is None:
            raise ValueError("method 'minference' has no calibration: bind_calibration first (LLM does; make one with "
                             "`python -m nanokv.calibrate minference --model NAME`), or give pattern=a_shape, "
                             "vertical_slash or block_sparse")
        if self.patterns.shape[1] != query_heads:
            raise ValueError(f"the minference calibration has {self.patterns.shape[1]} query heads per layer, the model "
                             f"{query_heads}; make it again for this model")
        return self.patterns[layer].to(device)

    def sizes(self) -> tuple[int, int]:
        """(sinks or vertical columns, window or slash diagonals): the budget split 1 : 4."""
        return self.budget // 5, self.budget - self.budget // 5

    def prefill_blocks(self, view: SparsePrefillView) -> torch.Tensor | None:
        T, Hq = view.queries.shape[:2]
        if T <= self.tile_size:
            return None  # one tile: nothing to skip
        kinds = self.head_patterns(view.layer, Hq, view.queries.device)
        mask = torch.zeros(Hq, *(2 * (-(-T // self.tile_size),)), dtype=torch.bool, device=view.queries.device)
        for kind, build in enumerate((self.a_shape, self.vertical_slash, self.block_sparse)):
            heads = (kinds == kind).nonzero().flatten()
            if len(heads):
                mask[heads] = build(view, heads)
        return mask

    def a_shape(self, view: SparsePrefillView, heads: torch.Tensor) -> torch.Tensor:
        """The tiles holding a sink (the first tokens) or a key within the local window of a query."""
        T, tile = view.queries.shape[0], self.tile_size
        sinks, window = self.sizes()
        n = -(-T // tile)
        i, j = torch.arange(n, device=heads.device)[:, None], torch.arange(n, device=heads.device)[None, :]
        nearest = ((i - j) * tile - (tile - 1)).clamp(min=0)  # the least query - key offset in tile (i, j)
        return ((j * tile < sinks) | (nearest < window)).expand(len(heads), n, n)

    def vertical_slash(self, view: SparsePrefillView, heads: torch.Tensor) -> torch.Tensor:
        """The tiles crossed by each head's top columns and top diagonals of the last queries' attention."""
        T, Hq, D = view.queries.shape
        H, tile, n = view.keys.shape[1], self.tile_size, -(-view.queries.shape[0] // self.tile_size)
        W = min(self.last_q, T)
        q = view.queries[-W:, heads].float()                                         # [W, h, D]
        keys = view.keys[:, heads // (Hq // H)].float()                             # [T, h, D] each head's kv-head
        logits = torch.einsum("whd,thd->hwt", q, keys) / D ** 0.5
        q_pos, k_pos = view.positions[-W:], view.positions
        offset = q_pos[:, None] - k_pos[None, :]                                     # [W, T] query - key
        probs = logits.masked_fill(offset < 0, float("-inf")).softmax(dim=-1)
        columns, diagonals = self.sizes()
        vertical = probs.sum(1)                                                      # [h, T]
        vertical[:, :self.forced] = float("inf")
        slash = torch.zeros_like(vertical).scatter_add_(1, offset.clamp(min=0).flatten().expand(len(heads), -1),
                                                        probs.flatten(1))            # [h, T] by offset
        slash[:, :self.forced] = float("inf")
        cols = vertical.topk(min(columns, T), dim=-1).indices
        offs = slash.topk(min(diagonals, T), dim=-1).indices
        hit = torch.zeros(len(heads), n, n + 1, dtype=torch.long, device=heads.device)  # column n: never a tile
        hit[:, :, :n] += torch.zeros(len(heads), n, dtype=torch.long, device=heads.device).scatter_add_(
            1, cols // tile, torch.ones_like(cols))[:, None, :]
        first = torch.arange(n, device=heads.device)[None, :, None] * tile           # each query tile's first query
        for lo in (first - offs[:, None, :], first + tile - 1 - offs[:, None, :]):   # the keys its diagonal crosses
            j = lo.div(tile, rounding_mode="floor")
            hit.scatter_add_(2, j.masked_fill(j < 0, n), torch.ones_like(j))
        return hit[:, :, :n] > 0

    def block_sparse(self, view: SparsePrefillView, heads: torch.Tensor) -> torch.Tensor:
        """Each query tile's budget / tile_size key tiles of highest mean-pooled q . k (causal)."""
        T, Hq, D = view.queries.shape
        H, tile = view.keys.shape[1], self.tile_size
        n = -(-T // tile)
        pad = n * tile - T

        def pooled(x):  # [T, h, D] -> [h, n, D], the mean of each tile's tokens
            x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(n, tile, x.shape[1], D).sum(1)
            count = torch.full((n,), float(tile), device=x.device)
            count[-1] = tile - pad
            return (x / count[:, None, None]).transpose(0, 1)

        q = pooled(view.queries[:, heads])
        k = pooled(view.keys[:, heads // (Hq // H)])
        scores = q @ k.transpose(1, 2)                                               # [h, n, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        top = scores.topk(min(n, max(1, self.budget // tile)), dim=-1)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
