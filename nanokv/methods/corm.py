"""corm: evict every key that each of the last w queries attended to below uniform.

Paper: CORM: Cache Optimization with Recent Message for Large Language Model Inference (Dai,
Huang, Jiang, Chen, Cai, Bi, Shi; Zhejiang University and Tencent AI Lab, 2024), arXiv
2404.15949. Adjacent queries are alike, so a key that the last few queries all ignored, the next
one will ignore too. Per (layer, kv-head): a key is unimportant to a query that gives it less
than α/t of its attention (t: the tokens that query attends to; α = 1 is uniform attention), and
a key unimportant to every one of the last w queries is evicted; the newest r tokens never are.
The paper sets no budget: the rule alone decides how much each head holds.

nanokv activates a method with a budget (budget= or compression=), which the scheduler plans
memory with, so here it is a ceiling: each head evicts every key the rule names, and if it still
holds more than the budget, the keys unimportant for longest (the oldest newest-important-query)
go first. Below the ceiling heads hold different numbers of tokens, each what the rule leaves.
The rule runs at the end of prefill too (the prompt's last w queries judge the prompt) and at
every generated token. A key is judged only once w queries have seen it.

State: one slot field per token, the position + 1 of the newest query that found it important
(0: none yet, read as the position before the token's own, so a key needs w queries to be named).
That is the last-w-queries rule for any w, where a bit per query (Scissorhands' history) holds at
most 62. Defaults: α = 1 (the uniform level); w = r = 32, ours (no public code; the paper tunes w
and r per experiment, and they are equal so that a key leaving the recent window has been seen
by w queries).

What differs:
- The budget ceiling (see above); with a budget no smaller than the prompt plus the generated
  tokens, only the rule evicts, as in the paper.
- GQA: a key stays if any query head of its group finds it important (the paper's rule per
  query head, kept for the kv-head all its queries share).
- Where the ceiling evicts beyond the rule, ties go to the oldest token (the engine's rule).
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, prompt_logits, top_per_head


class CORM(DecodeEvictor):
    name = "corm"
    description = "evict keys every one of the last w queries attended below uniform; the budget is a ceiling"
    paper = "https://arxiv.org/abs/2404.15949"
    options = {
        "window": (int, 32, "an integer >= 1 (w: the recent queries a key must be unimportant to)",
                   lambda v: v >= 1),
        "recent_size": (int, 32, "an integer >= 0 (r: the newest tokens, never evicted)", lambda v: v >= 0),
        "threshold": (float, 1.0, "a number > 0 (α: a query finds a key unimportant below α/t, t the tokens "
                                  "it attends to)", lambda v: v > 0),
    }
    slot_fields = {"corm_important": torch.int64}
    budgets_from_state = True  # how many a head evicts is what the rule names

    def recent_window(self, budget):
        return budget.clamp(max=self.recent_size)

    @staticmethod
    def last_important(field, key_positions):
        """The position of the newest query that found each key important (one before the key's
        own while none has)."""
        return torch.maximum(field - 1, key_positions - 1)

    def named(self, field, key_positions, query_position, outside_recent):
        """The keys the rule evicts: none of the last w queries found them important."""
        return outside_recent & (self.last_important(field, key_positions) <= query_position - self.window)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """Position + 1 of the newest of the prompt's last min(w, T) queries that found each key
        important (any query head of the group); 0 where none did."""
        H, S, _ = view.keys.shape
        T = len(view.queries)
        newest = torch.zeros(H, S, dtype=torch.int64, device=view.keys.device)
        for start, logits in prompt_logits(view, max(0, T - self.window)):
            probs = logits.softmax(dim=-1)                                         # [Hq, c, S]
            attended = (logits > float("-inf")).sum(dim=-1, keepdim=True)         # t per query
            important = (probs >= self.threshold / attended).unflatten(0, (H, -1)).any(dim=1)   # [H, c, S]
            q_pos = view.positions[S - T + start:S - T + start + logits.shape[1]]
            newest = torch.maximum(newest, (important * (q_pos[None, :, None] + 1)).amax(dim=1))
        return {"corm_important": newest}

    def scores(self, view: PrefillView) -> torch.Tensor:
        last = self.last_important(self.state_of(view)["corm_important"], view.positions).double()
        order = view.positions.double() / (2 * (int(view.positions.max()) + 1))  # ties: the oldest goes
        return self.protect_recent(last + order[None, :])

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        """The prompt's keys the rule leaves, then each head's `budget` newest-important of them."""
        S = view.keys.shape[1]
        scores = self.scores(view)
        keep = ~self.named(self.state_of(view)["corm_important"], view.positions, view.positions[-1],
                           scores < float("inf"))                                 # +inf: the recent window
        budget = self.layer_budget(S, view.layer, view.num_layers)
        if budget < S:
            keep &= top_per_head(scores, budget)
        return None if bool(keep.all()) else keep

    def decode_scores(self, probs, state, step):
        uniform = self.threshold / step.visible.sum(dim=-1)                         # α / t  [B, H]
        important = (probs >= uniform[..., None, None]).any(dim=2) & step.visible  # any query head
        field = torch.where(important, step.positions[:, None, None] + 1, state["corm_important"])
        return self.last_important(field, step.key_positions).float(), {"corm_important": field}

    def decode_budgets(self, state, step):
        """The budget, or fewer where the rule names more: a head evicts max(what the rule names,
        what it holds over the budget)."""
        q_pos = step.positions[:, None, None]
        outside_recent = step.visible & (step.key_positions <= q_pos - self.recent_window(step.budgets)[:, None, None])
        named = self.named(state["corm_important"], step.key_positions, q_pos, outside_recent)
        return torch.minimum(super().decode_budgets(state, step), step.visible.sum(dim=-1) - named.sum(dim=-1))
