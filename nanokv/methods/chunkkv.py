"""chunkkv: keep whole chunks of consecutive tokens, the same ones in every head, by SnapKV scores.

Paper: ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference (Liu et al., 2025), arXiv 2502.00299. Token-level eviction tears phrases apart;
ChunkKV keeps or drops `chunk_length` consecutive tokens at a time. Per layer: SnapKV's scores
(observation-window attention, pooled, GQA-averaged), the window scoring one above the best
prefix score; the prompt cut into chunks from its first token (the last one may be shorter);
a chunk's score is its tokens' scores summed over the kv-heads and averaged over its tokens;
the top (budget // chunk_length) chunks are kept, the same in every head. With a budget under
one chunk, or a prompt shorter than one, SnapKV's token-level selection is kept instead.
Layer-wise index reuse (the paper's): with `reuse_layers=N` the layers 0, N, 2N, ... select
and each of the N - 1 layers after one keeps what it kept.

Defaults: chunk_length=10 (the paper's chosen size), reuse_layers=1, and SnapKV's
(window_size=32, max pooling, kernel_size=7). The official code is kvpress's ChunkKVPress around
SnapKVPress (NVIDIA/kvpress @ 8bb29b9; the paper links it; no separate authors' repository),
whose defaults are chunk_length=20, window_size=64, kernel_size=5, average pooling, no reuse:
with those its kept sets equal these.
What differs:
- kvpress keeps max(1, int(chunks x (1 - r))) chunks, counting a short last one, which can
  overshoot the budget by less than a chunk; here the whole chunks the budget holds.
- with a budget under one chunk kvpress still keeps one chunk; here SnapKV's token-level
  selection (as kvpress does for a prompt shorter than one chunk).
- the window sits inside the chunk grid, scored above the prefix (kvpress), not apart from it as
  in the paper's algorithm.
- max pooling (the default) has no kvpress counterpart (SnapKVPress pools by average); each
  query head is pooled, then the group averaged, as kvpress and official SnapKV order it.
"""

import torch

from nanokv.methods.base import PrefillView
from nanokv.methods.snapkv import SnapKV


class ChunkKV(SnapKV):
    name = "chunkkv"
    description = "SnapKV scores summed per chunk of consecutive tokens; top chunks kept, same in every head"
    paper = "https://arxiv.org/abs/2502.00299"
    options = {**SnapKV.options,
               "chunk_length": (int, 10, "an integer >= 1", lambda v: v >= 1),
               "reuse_layers": (int, 1, "an integer >= 1 (layers sharing one selection)", lambda v: v >= 1)}

    def scores(self, view: PrefillView) -> torch.Tensor:
        scores = super().scores(view)
        prefix = scores[:, :max(0, scores.shape[1] - min(self.window_size, scores.shape[1]))]
        if prefix.numel():  # the window scores one above the best prefix score (as kvpress pads it)
            scores = scores.masked_fill(scores.isinf(), float(prefix.max()) + 1)
        return scores

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        keep = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if keep >= S:
            return None
        state = view.sequence_state
        if view.layer % self.reuse_layers and "chunkkv_keep" in state:
            return state["chunkkv_keep"]          # reuse the selecting layer's chunks
        kept_chunks = keep // self.chunk_length
        if kept_chunks == 0 or S < self.chunk_length:
            mask = super().keep_mask(view)        # token-level SnapKV
        else:
            token = view.all_heads(self.scores(view)).sum(dim=0)  # [S] summed over the kv-heads, every rank's
            starts = torch.arange(0, S, self.chunk_length, device=token.device)
            chunk = torch.arange(S, device=token.device) // self.chunk_length
            sums = torch.zeros(len(starts), device=token.device).index_add_(0, chunk, token)
            means = sums / torch.bincount(chunk, minlength=len(starts)).to(sums.dtype)
            top = means.topk(kept_chunks).indices
            mask = torch.isin(chunk, top).expand(H, S).clone()
        state["chunkkv_keep"] = mask
        return mask
