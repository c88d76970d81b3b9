"""fastkv: past a middle layer only the prompt's important tokens go on; every layer keeps SnapKV's picks.

Paper: FastKV: KV Cache Compression for Fast Long-Context Processing with Token-Selective
Propagation (Dongwon Jo, Jiwon Song, Yulhwa Kim, Jae-Joon Kim; arXiv 2025), arXiv 2502.01068
(later revised as "FastKV: Decoupling of Context Reduction and KV Cache Compression for
Prefill-Decoding Acceleration"). Early layers need the whole context to find what matters; later
ones do not. So:

    layers 0 .. tsp_layer     the whole prompt runs through them
    tsp_layer (TSP)           SnapKV-style window scores, summed over all heads, pick the tokens
                              whose hidden states go on: the top (tsp - window) of the prefix plus
                              the observation window, at their own positions
    later layers              compute, and hold, only those tokens
    every layer               keeps, per kv-head, the top (k - window) prefix tokens by the same
                              window scores plus the window (SnapKV), among what it holds

The window scores: the last `window_size` queries' softmax attention over the keys (causal inside
the window), summed over the window queries, pooled per query head (kernel_size), summed over the
query heads of each kv-head (GQA). k (the KV each layer keeps) is the request's budget, counted
from the whole prompt (compression r keeps ceil((1 - r) n) in every layer, those after TSP
included); tsp (how many go on) is `tsp_len` with --budget (the official "constant" mode) and
ceil(tsp_rate n) with --compression (the official "proportional" mode). A prompt within the
budget runs whole and keeps everything. Prefill attention costs about
(t + 1) / L + (L - t - 1) / L * (m / n)^2 of full's (t: the TSP layer, m tokens go on; causal,
quadratic in length), and the MLPs of the layers past t run on m rows.

Defaults, from the official code (dongwonjo/FastKV @ b978769, eval/run_longbench.py arguments;
the cluster in baselines/fastkv/utils.py): window_size 8, kernel_size 7, maxpool, budget 512
(--max_capacity_prompts), tsp_len 2048, tsp_rate 0.2, TSP layer 15 of Llama-3.1-8B's 32 (0-based,
as the code's layer index); for a model that is not 32 layers deep `tsp_layer=-1` (the default)
takes the same share of the depth, round(15 L / 32). scripts/eval_longbench.sh runs the
proportional mode (retain 0.1, tsp_rate 0.2). No TSP when the prompt is shorter than the budget,
or not longer than tsp (as the official update_kv).

What differs:
- Scores stay float32; the official code casts the softmax back to fp16 before summing.
- Sums over window queries and heads are means here (snapkv.py's scores): the same ranking.
- tsp_rate rounds up (ceil), as nanokv's compression does; the official int() rounds down.
- A later layer's budget is the request's, counted from the whole prompt; the official
  proportional mode gets the same from retain_rate / tsp_rate of the propagated tokens.
- A (context, question) prompt: the context alone is scored and narrowed (its last tokens are the
  window); the question goes through every layer whole, after it. The official code scores the
  whole prompt, question last.
"""

import math

import torch

from nanokv.cache.build import CacheRequest
from nanokv.methods.base import PrefillView, top_per_head
from nanokv.methods.snapkv import SnapKV

PAPER_LAYERS, PAPER_TSP = 32, 15  # Llama-3.1-8B: token-selective propagation after layer 15 of 32


class FastKV(SnapKV):
    name = "fastkv"
    description = "SnapKV in every layer; past a middle layer only the top tokens' hidden states go on"
    paper = "https://arxiv.org/abs/2502.01068"
    default_budget = 512  # the official --max_capacity_prompts
    narrows = True
    options = {
        "window_size": (int, 8, "an integer >= 1", lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
        "pooling": (str, "max", "'max' or 'avg'", lambda v: v in ("max", "avg")),
        "tsp_layer": (int, -1, "an integer >= 0 below the model's depth, or -1 (15 of 32 layers, scaled)",
                      lambda v: v >= -1),
        "tsp_len": (int, 2048, "an integer >= 1 (tokens that go on past tsp_layer, with --budget)",
                    lambda v: v >= 1),
        "tsp_rate": (float, 0.2, "a number in (0, 1] (the share of the prompt that goes on, with --compression)",
                     lambda v: 0 < v <= 1),
    }

    def tsp_at(self, num_layers: int) -> int:
        """The TSP layer of a num_layers-deep model."""
        if self.tsp_layer == -1:
            return min(num_layers - 1, round(PAPER_TSP * num_layers / PAPER_LAYERS))
        if self.tsp_layer >= num_layers:
            raise ValueError(f"option tsp_layer={self.tsp_layer} of method 'fastkv' must be in 0 .. {num_layers - 1} "
                             f"for this {num_layers}-layer model (or -1: 15 of 32 layers, scaled)")
        return self.tsp_layer

    def cache_request(self, num_layers: int, head_dim: int) -> CacheRequest:
        self.tsp_at(num_layers)  # a tsp_layer past the model is refused when it loads, not at its first prompt
        return super().cache_request(num_layers, head_dim)

    def propagated(self, n: int) -> int:
        """Tokens of an n-token prompt that go on past the TSP layer."""
        return self.tsp_len if self.budget is not None else math.ceil(self.tsp_rate * n)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        # the budget counts the whole prompt: layer 0 holds it all (layers after TSP hold fewer)
        n = view.sequence_state.setdefault("prompt_len", view.keys.shape[1])
        S = view.keys.shape[1]
        k = self.tokens_to_keep(n)
        if k >= S:
            return None
        return top_per_head(self.scores(view), k)

    def propagate(self, view: PrefillView) -> torch.Tensor | None:
        if view.layer != self.tsp_at(view.num_layers):
            return None
        n = view.keys.shape[1]  # nothing narrowed before TSP: the whole prompt
        tsp = self.propagated(n)
        if (self.budget is not None and n < self.budget) or n <= tsp:
            return None
        # the window scores +inf, so it always goes on; then the prefix's best over all heads (every rank's)
        chosen = view.all_heads(self.scores(view)).sum(dim=0).topk(max(tsp, min(self.window_size, n))).indices
        return torch.zeros(n, dtype=torch.bool, device=view.keys.device).scatter_(0, chosen, True)
