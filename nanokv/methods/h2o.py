"""h2o: keep the heavy hitters (most attention received so far) plus the most recent tokens.

Paper: H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models
(Zhang et al., NeurIPS 2023), arXiv 2306.14048. A few tokens receive most of the attention,
and a token's attention summed over the queries so far predicts its future share. Per
(layer, kv-head): each token's score is its accumulated attention, set at prefill to the
column sums of the prompt's attention and increased at every decode step by the current
query's attention. The cache holds a fixed budget: the newest `recent_ratio` of it is never
evicted, and whenever a head holds one token more than its budget the token with the lowest
score outside that window goes. Default recent_ratio=0.5: the official real-drop cache
(FMInference/H2O @ ac75c2a, h2o_hf/utils_real_drop H2OKVCache_LayerWise; run_summarization.py
hh_size = recent_size = 1024), the paper's 10% heavy + 10% recent being the same split.
kvpress's ObservedAttentionPress is the prefill half with no recent window and each column sum
divided by the number of queries that see the key: `recent_ratio=0 normalize=true`.

What differs:
- GQA (the official code is MHA only): the attention of the query heads sharing a kv-head is
  averaged.
- Scores accumulate in float32; the official cache keeps them in the model dtype (near-ties).
- An odd budget gives the heavy part the extra token (recent = int(budget x recent_ratio)).
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView


class H2O(DecodeEvictor):
    name = "h2o"
    description = "keep the tokens with the most accumulated attention plus a recent window (every step)"
    paper = "https://arxiv.org/abs/2306.14048"
    options = {
        "recent_ratio": (float, 0.5, "a number in [0, 1) (share of the budget kept for the newest tokens)",
                         lambda v: 0 <= v < 1),
        "normalize": (bool, False, "true or false (divide prefill column sums by the queries that see each key)",
                      lambda v: True),
    }
    needs_column_sums = True
    slot_fields = {"h2o_score": torch.float32}

    def recent_window(self, budget):
        return (budget * self.recent_ratio).long()

    def scores(self, view: PrefillView) -> torch.Tensor:
        scores = view.column_sums.clone()
        S = scores.shape[1]
        if self.normalize:
            scores /= torch.arange(S, 0, -1, device=scores.device)
        return self.protect_recent(scores)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        return {"h2o_score": view.column_sums}

    def decode_scores(self, probs, state, step):
        accumulated = state["h2o_score"] + probs.mean(dim=2)
        return accumulated, {"h2o_score": accumulated}
