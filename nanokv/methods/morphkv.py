"""morphkv: keep the recent window and the older tokens the window's queries attend to most.

Paper: Dialogue Without Limits: Constant-Sized KV Caches for Extended Responses in LLMs (Ghadia,
Kumar, Jain, Nair, Das; ICML 2025), arXiv 2503.00979; official code ghadiaravi13/MorphKV @
8903d2a (morphkv/models/patch_llama.py `morphkv_mask`, morphkv/morph_cache.py). A long answer
drifts from topic to topic, so what the newest tokens attend to says which older tokens still
matter. Per (layer, kv-head) the cache holds a constant budget B: the newest R tokens, plus the
C = B - R older tokens that the R window queries attend to most. Each window query's attention
logits (summed over the query heads of the group, GQA) are softmaxed over the older tokens only;
an older token's score is the max of those probabilities over the R queries ("max_fused") or
their sum ("sum_fused"), and the top C stay. The cache is re-ranked at every generated token.
Defaults: fusion max (the --morph_type default of LongBench/pred_single.py, LongGenBench/
Evalution/inference_hf.py and LongWriter/evaluation/pred.py, and the README's LongGenBench run);
R = 32 (the repo's LongBench runs, LongBench/pred/llama3.1-8b-instruct/*_ws32_*; its README runs
use 30 and 200, its argparse default is 3).

State: the last R queries' logits of every key, a ring of R slot fields (`morphkv_logit<k>`
holds the row of the query whose position is k mod R), 4R bytes per token and head. At decode
the engine hands the query's probabilities, not its logits: the ring stores Σ_group log p, which
differs from Σ_group logit by a constant per query (the log of each head's softmax normaliser),
and that constant cancels in the softmax over the older tokens, so the ranking is the official
one. At prefill the rows are the last R prompt queries' logits themselves.

What differs from the official code:
- The window is the current query and the R - 1 before it, and it is the R newest tokens: a
  head holds B. Officially the current query is scored by the R queries before it, attends over
  the top C and the last R + 1 tokens, and only then is the rest dropped (B + 1 held).
- The prompt is cut to B at the end of prefill, from its last R queries (the same rule);
  officially the first decode step cuts it, from the same queries.
- A log-probability that underflowed to 0 (a logit over ~100 below its row's maximum) weighs 0
  instead of e^-100.
- Scores in float32 (the official code softmaxes in the model dtype); among equal scores the
  oldest goes (official: topk's order).
- No evict_after (bursty eviction) option: every step, as the paper's default run (1.0).
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, prompt_logits
from nanokv.methods.query_ring import ring_fields, ring_positions, ring_write


def correlation(rows, row_positions, key_positions, older, fusion):
    """rows [R, ..., S]: each window query's logits (up to a constant per row); row_positions
    [R, ..., 1]: that query's position; older [..., S]: the keys ranked. Each row is softmaxed over
    the older keys its query saw; -> [..., S] their max or sum over the rows (0 where not older)."""
    seen = older[None] & (key_positions[None] <= row_positions)
    probs = rows.masked_fill(~seen, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # a row that saw none: 0
    return probs.amax(dim=0) if fusion == "max" else probs.sum(dim=0)


class MorphKV(DecodeEvictor):
    name = "morphkv"
    description = "recent window + the older tokens its queries attend to most (max or sum), re-ranked every step"
    paper = "https://arxiv.org/abs/2503.00979"
    options = {
        "window_size": (int, 32, "an integer >= 1 (R: the newest tokens, never evicted, whose queries rank "
                                 "the older ones)", lambda v: v >= 1),
        "fusion": (str, "max", "'max' or 'sum' (how the R queries' attention to an older token is combined)",
                   lambda v: v in ("max", "sum")),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        self.slot_fields = ring_fields("morphkv_logit", self.window_size)

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for morphkv "
                             f"(the budget holds the window and the older tokens it ranks)")

    def recent_window(self, budget):
        return budget.clamp(max=self.window_size)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The logits of the prompt's last min(R, T) queries (summed over each group), each in the
        field of its position mod R; 0 in fields no prompt query wrote (never read: see ring_positions)."""
        H, S, _ = view.keys.shape
        T = len(view.queries)
        state = {name: torch.zeros(H, S, device=view.keys.device) for name in self.slot_fields}
        names = list(self.slot_fields)
        for start, logits in prompt_logits(view, max(0, T - self.window_size)):
            rows = logits.unflatten(0, (H, -1)).sum(dim=1)                       # [H, c, S]
            for j, position in enumerate(view.positions[S - T + start:S - T + start + rows.shape[1]].tolist()):
                state[names[position % self.window_size]] = rows[:, j]
        return state

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S, _ = view.keys.shape
        newest = view.positions[-1]
        rows = torch.stack(list(self.state_of(view).values()))                   # [R, H, S]
        recent = self.recent_window(torch.tensor(self.decode_budget(S), device=newest.device))
        older = (view.positions <= newest - recent).expand(H, S)
        return self.protect_recent(correlation(rows, ring_positions(newest, self.window_size).view(-1, 1, 1),
                                               view.positions, older, self.fusion))

    def decode_scores(self, probs, state, step):
        now = probs.log().sum(dim=2)                       # Σ_group log p: Σ logit - a constant per query
        state = ring_write(state, list(self.slot_fields), now, step.positions)
        rows = torch.stack(list(state.values()))                                  # [R, B, H, S]
        q_pos = step.positions[:, None, None]
        older = step.visible & (step.key_positions <= q_pos - self.recent_window(step.budgets)[:, None, None])
        row_positions = ring_positions(q_pos, self.window_size)                   # [R, B, 1, 1]
        return correlation(rows, row_positions, step.key_positions, older, self.fusion), state
