"""alisa: keep the newest tokens plus those the recent queries attended to most (Sparse Window Attention).

Paper: ALISA: Accelerating Large Language Model Inference via Sparsity-Aware KV Caching (Zhao,
Wu, Wang; ISCA 2024), arXiv 2403.17312, Section III-A (Sparse Window Attention). Paper only:
no public code found (searched GitHub repositories and code for ALISA and the title; the
awesome-KV-cache lists give "Code: N/A").
Attention in autoregressive decoding is sparse, and which past tokens matter changes from step
to step. SWA keeps two kinds of token per (layer, head):
- locally static: the newest tokens, always kept (`local_ratio` of the budget);
- globally dynamic: the rest of the budget, the tokens with the most attention summed over
  the queries of the recent window, picked again at every step.
Per head, a token's score is its attention from the last `query_window` queries, kept as a
ring of slot fields indexed by query position mod query_window (a query writes its
attention into its own field). A head over budget evicts the lowest score outside the local
window. At prefill the prompt's last query_window queries score the prompt the same way.
Defaults: local_ratio 0.5, the budget split evenly between the two kinds (≈: our reading of
Section III-A; the paper reports results by KV sparsity, not by split). query_window 16 is nanokv's
own choice (see below).

What differs:
- Eviction, not sparse attention. In the paper the tokens SWA leaves out stay in the cache
  (GPU or offloaded to the CPU) and may be picked again at a later step. Here they are gone:
  the cache holds the budget.
- The queries' window: the paper sums over the recent window of queries. Here it is a fixed
  `query_window` of them (4 bytes per token per query in the ring), not one that grows
  with the budget's local part.
- GQA (the paper uses OPT / LLaMA-1, all MHA): the attention of the query heads sharing a
  kv-head is averaged.
- Left out, being other waves' parts: the three-phase dynamic scheduling (GPU caching,
  GPU-CPU caching, recomputation), the CPU offload, and the INT8 KV compression (nanokv's int8
  and kivi quantizers are separate methods).
"""

from nanokv.methods.query_ring import QueryRingEvictor


class ALISA(QueryRingEvictor):
    name = "alisa"
    description = "keep the newest tokens plus those the last queries attended to most (Sparse Window Attention)"
    paper = "https://arxiv.org/abs/2403.17312"
    options = {
        "local_ratio": (float, 0.5, "a number in [0, 1) (share of the budget kept for the newest tokens)",
                        lambda v: 0 <= v < 1),
        "query_window": (int, 16, "an integer in [1, 256] (the recent queries whose attention is summed)",
                         lambda v: 1 <= v <= 256),
    }

    ring_prefix = "alisa_attention"

    def ring_size(self) -> int:
        return self.query_window

    def recent_window(self, budget):
        return (budget * self.local_ratio).long()
