"""vatp: H2O whose accumulated attention is weighed by each token's value norm, sinks always kept.

Paper: Attention Score is not All You Need for Token Importance Indicator in KV Cache Reduction:
Value Also Matters (Guo et al., EMNLP 2024), arXiv 2406.12335. What a token adds to the
attention output is its attention times its value vector, and value norms vary a lot between
tokens: the attention sinks draw much attention and carry tiny values. VATP scores a token by
its accumulated attention times the L1 norm of its value vector, score = (Σ_q a_q) · ‖v‖₁, and
otherwise runs H2O: per (layer, kv-head) the accumulated attention is set at prefill to the
column sums of the prompt's attention and grows by each decode query's attention (averaged
over the query heads of the group, GQA; the value is the kv-head's own); the newest
`recent_ratio` of the budget is never evicted, and whenever a head holds one token more than
its budget the lowest score outside that window goes. Because the sinks' value norms are tiny,
the first `sink_size` tokens of the sequence are always kept (score +inf), as the official code
does. The norm is of the value as cached (values carry no RoPE), read from the cache
(`needs_values` at prefill, `decode_reads` at decode); the slot field holds the plain sum,
which equals the official running sum of a·‖v‖₁ since a token's norm never changes.

Defaults from the official code (guozhiyu/vatp @ 39ea686, its H2O setting `--h2o --apval`:
`--heavy_ratio` = recent ratio, so half the budget recent, as our h2o); sink_size=20, the sink
length of the official README's LongBench command (pred.py's `--sink_len` has no default).
What differs:
- a decode query attends over the budget plus itself before the eviction (the engine's rule);
  the official mask, built at the step before, holds it to exactly the budget.
- the official recent mask leaves the token at S - recent out of both windows for one step
  (a quirk of H2O's code), not reproduced.
- GQA: the group's mean attention times the kv-head's own value norm (the official code is MHA).
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView


class VATP(DecodeEvictor):
    name = "vatp"
    description = "H2O's accumulated attention times each value's L1 norm, sinks kept (every step)"
    paper = "https://arxiv.org/abs/2406.12335"
    options = {
        "recent_ratio": (float, 0.5, "a number in [0, 1) (share of the budget kept for the newest tokens)",
                         lambda v: 0 <= v < 1),
        "sink_size": (int, 20, "an integer >= 0 (the first tokens, always kept)", lambda v: v >= 0),
    }
    needs_column_sums = True
    needs_values = True
    decode_reads = frozenset({"values"})
    slot_fields = {"vatp_attention": torch.float32}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_size:
            raise ValueError(f"budget={self.budget} must exceed sink_size={self.sink_size} for vatp")

    def recent_window(self, budget):
        return (budget * self.recent_ratio).long()

    def weigh(self, attention, values, positions):
        """attention [..., S] times ‖v‖₁ of values [..., S, D]; +inf at positions < sink_size."""
        score = attention * values.float().abs().sum(dim=-1)
        return score.masked_fill(positions < self.sink_size, float("inf"))

    def scores(self, view: PrefillView) -> torch.Tensor:
        return self.protect_recent(self.weigh(view.column_sums, view.values, view.positions[None, :]))

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        return {"vatp_attention": view.column_sums}

    def decode_scores(self, probs, state, step):
        accumulated = state["vatp_attention"] + probs.mean(dim=2)
        return self.weigh(accumulated, step.values, step.key_positions), {"vatp_attention": accumulated}
