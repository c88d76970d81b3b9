"""critiprefill: each segment of the prompt's queries attends only to its most critical key blocks.

Paper: CritiPrefill: A Segment-wise Criticality-based Approach for Prefilling Acceleration in LLMs
(Lv et al., 2024), arXiv 2409.12490; code 66RING/CritiPrefill. Nearby queries need nearly the same
keys, so criticality can be estimated per segment of queries and block of keys rather than per
token. The prompt's queries split into segments, its keys into blocks; each segment is pooled into
representative queries (its channel-wise max and min), each block into representative keys (its
max and min); a block's criticality for a segment is
    max(mean(q_max . k_max, q_min . k_max), mean(q_max . k_min, q_min . k_min)),
averaged over the query heads of a kv-head, softmaxed over the blocks before the segment, and (layer
fusion) mixed with the previous layer's: w = 0.25 w_previous + 0.75 w. Each segment then attends to
its top budget / tile_size blocks before it and to itself (causally).
Segments that start before `threshold_len`, and the last segment (it makes the next token), stay
dense, as do the first `layer_skip` layers. Decoding reads the whole cache (nothing is evicted).

Defaults (66RING/CritiPrefill criti_prefill/modeling_patch.py `criti_config` and ops.py, commit
a1955b4): segment_size 512, block_size 32 (here tile_size), budget 2048 tokens of key blocks per segment,
threshold_len 4096, layer_fusion on with the previous layer weighing 0.25, layer_skip 1 (layer 0
dense; the first scored layer starts the fusion, as the official `layer_idx <= 1`).

What differs:
- The engine computes tiles of tile_size x tile_size (a segment is segment_size / tile_size
  query tiles with the same picks), through a block-sparse kernel (kernels/sparse_prefill.py), not
  by gathering the picked K/V and calling FlashAttention per segment; the maths is the same.
- A segment with fewer blocks before it than the budget attends to all of them (the official code
  assumes threshold_len >= budget, which it does not check).
- The fused weights are kept per sequence across the layers of one prefill (the official keeps
  them on the model, one prompt at a time).
- Only a prompt the sequence holds alone is sparse: a recompute's generated tokens, and layers
  with a sliding window, attend densely (methods/base.py: SparsePrefill).
"""

import torch

from nanokv.methods.base import SparsePrefill, SparsePrefillView

PREVIOUS_WEIGHT = 0.25  # layer fusion: the previous layer's share of a block's criticality (official pprev)


class CritiPrefill(SparsePrefill):
    name = "critiprefill"
    description = "sparse prefill: each query segment attends to its top key blocks (pooled max/min criticality)"
    paper = "https://arxiv.org/abs/2409.12490"
    default_budget = 2048
    options = {
        "segment_size": (int, 512, "a positive multiple of tile_size (query tokens per segment)", lambda v: v > 0),
        "tile_size": (int, 32, "a power of two >= 1 (key tokens per block; the kernel's tile)",
                       lambda v: v > 0 and v & (v - 1) == 0),
        "threshold_len": (int, 4096, "an integer >= 0 (segments starting before it stay dense)", lambda v: v >= 0),
        "layer_skip": (int, 1, "an integer >= 0 (the first layers, dense)", lambda v: v >= 0),
        "layer_fusion": (bool, True, "true or false (mix each layer's criticality with the previous one's)",
                         lambda v: True),
    }

    def check_budget(self):
        if self.segment_size % self.tile_size:
            raise ValueError(f"option segment_size={self.segment_size} of method critiprefill must be a multiple of "
                             f"tile_size={self.tile_size}")
        if self.budget is not None and self.budget < self.tile_size:
            raise ValueError(f"critiprefill's budget {self.budget} is below one block of tile_size={self.tile_size} "
                             f"tokens; give --budget >= {self.tile_size}")

    def criticality(self, view: SparsePrefillView, pool_len: int) -> torch.Tensor:
        """[H, segments, blocks] softmaxed criticality of each key block for each query segment, over
        the first pool_len tokens (every segment but the last); blocks at or after a segment get 0."""
        T, Hq, D = view.queries.shape
        H = view.keys.shape[1]
        S, B = self.segment_size, self.tile_size
        q = view.queries[:pool_len].view(pool_len // S, S, H, Hq // H, D)
        k = view.keys[:pool_len].view(pool_len // B, B, H, D)
        q_max, q_min = q.amax(1).float(), q.amin(1).float()                           # [segments, H, group, D]
        k_max, k_min = k.amax(1).float(), k.amin(1).float()                           # [blocks, H, D]

        def mean_over_queries(keys):  # -> [H, group, segments, blocks]
            return (torch.einsum("shgd,bhd->hgsb", q_max, keys) + torch.einsum("shgd,bhd->hgsb", q_min, keys)) / 2

        scores = torch.maximum(mean_over_queries(k_max), mean_over_queries(k_min))
        scores = scores.mean(dim=1)                                                    # per kv-head
        before = self.blocks_before(pool_len, scores.device)
        scores = scores.masked_fill(~before, torch.finfo(torch.float32).min)          # as the official mask
        return scores.softmax(dim=-1)

    def blocks_before(self, pool_len: int, device) -> torch.Tensor:
        """[segments, blocks] bool: the blocks that end before each segment starts."""
        per_segment = self.segment_size // self.tile_size
        segments = torch.arange(pool_len // self.segment_size, device=device)
        return torch.arange(pool_len // self.tile_size, device=device)[None, :] < (segments * per_segment)[:, None]

    def prefill_blocks(self, view: SparsePrefillView) -> torch.Tensor | None:
        T, Hq = view.queries.shape[:2]
        H = view.keys.shape[1]
        S, B = self.segment_size, self.tile_size
        pool_len = (-(-T // S) - 1) * S  # every segment but the last
        # the segments that go sparse: started at or past threshold_len, and not the last
        sparse = [s for s in range(pool_len // S) if s * S >= self.threshold_len]
        if view.layer < self.layer_skip or not sparse:
            return None
        weights = self.criticality(view, pool_len)
        state = view.sequence_state
        if self.layer_fusion and "critiprefill" in state:
            weights = PREVIOUS_WEIGHT * state["critiprefill"] + (1 - PREVIOUS_WEIGHT) * weights
        state["critiprefill"] = weights
        top = weights.topk(min(self.budget // B, weights.shape[-1]), dim=-1).indices  # [H, segments, k]
        picked = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, top, True)
        picked &= self.blocks_before(pool_len, weights.device)  # fewer blocks before it than the budget: all
        n, per_segment = -(-T // B), S // B
        mask = torch.ones(H, n, n, dtype=torch.bool, device=weights.device)
        for s in sparse:
            rows = slice(s * per_segment, (s + 1) * per_segment)
            mask[:, rows, :] = False
            mask[:, rows, :picked.shape[-1]] = picked[:, s, None, :]
            mask[:, rows, rows] = True  # the segment over itself (causal: SparsePrefill.tile_mask)
        return mask.repeat_interleave(Hq // H, dim=0)
