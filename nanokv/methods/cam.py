"""cam: keep the first and the newest tokens; merge each evicted value into the tokens after it.

Paper: CaM: Cache Merging for Memory-efficient LLMs Inference (Zhang et al., ICML 2024),
https://openreview.net/forum?id=LCTmppB165, official code zyxxmu/cam. Dropping a token
perturbs every later attention output; CaM folds the dropped token's value into the tokens
that stay, with a probability that grows with the attention it drew. Keys are untouched.

Base policy (the official code's: start + recent windows): the first `start_ratio` of the
budget stays (start tokens) and the newest tokens fill the rest; a head over budget drops its
oldest token past the start ones. A is each token's accumulated attention, H2O-style: the
prompt's column sums, plus each decode query's attention (averaged over the query heads of a
group, GQA). The evicted token e merges into the next m' <= m = `merge_budget` tokens the head
holds after it: p = clamp(A_e / mean(A over the m'), 0, 1) (0/0 -> 0, x/0 -> 1), a Bernoulli
draw M ~ B(p), and v_e * M / m' is added to each of their values. At prefill the prompt's
evictions run in the same order, oldest first, each into the next m prompt tokens (which may
go later and carry it on), with A the prompt's column sums. M is hashed_uniform(seed, layer,
kv-head, position of e) < p: a recompute replays the same draws.

Defaults (official code zyxxmu/cam @ fc80e64): start_ratio=0.5 (the official runs keep start
10% + recent 10%: half and half); merge_budget=32 (utils_hh's `merge_budget = 32`, kvpress
CAMPress's default; the streaming code uses 16).
What differs:
- the official runs size both windows from the prompt length; here they split the budget.
- at prefill every evicted prompt token is merged, oldest first, into the next m tokens over a
  dense prefill (the lm-eval simulation's order, without its start + recent mask on the prompt's
  own queries); the generation code (utils_hh) merges one token per decode step only.
- A at decode includes the prompt's column sums (kvpress and the official generation code use
  decode attention only), so p saturates at 1 more often.
- the paper's p (mean over the m targets; kvpress's too) is used at prefill as well, where the
  lm-eval simulation divides by the most attention in the windows; A there is the whole
  prompt's column sums, not the sums up to when the token would have left the window.
- with fewer than m tokens after e the share is 1/m' (kvpress), not 1/m.
- the evicted token is merged; the generation code's merge index is off by one (the oldest
  token still in the next window).
- GQA: the query group's mean attention (kvpress); the official code is MHA only.
"""

import torch

from nanokv.methods.base import DecodeEvictor, DecodeStep, Merger, PrefillView, hashed_uniform


def merge_probability(evicted: torch.Tensor, mean_target: torch.Tensor) -> torch.Tensor:
    """clamp(A_e / mean A of the targets, 0, 1): 0/0 (nothing attended) is 0, x/0 is 1."""
    p = evicted / mean_target
    return torch.where(p.isnan(), 0.0, p).clamp(0, 1)


class CaM(DecodeEvictor, Merger):
    name = "cam"
    description = "keep start + recent tokens; merge each evicted value into the next ones, with probability"
    paper = "https://openreview.net/forum?id=LCTmppB165"
    options = {
        "start_ratio": (float, 0.5, "a number in [0, 1) (share of the budget kept for the first tokens)",
                        lambda v: 0 <= v < 1),
        "merge_budget": (int, 32, "an integer >= 1 (tokens each evicted value is merged into)", lambda v: v >= 1),
        "seed": (int, 0, "an integer (another stream of merge draws)", lambda v: True),
    }
    needs_column_sums = True
    needs_values = True
    decode_reads = frozenset({"values"})
    slot_fields = {"cam_attention": torch.float32}

    def start_tokens(self, budget):
        """How many first positions are never evicted, for a budget (an int or a tensor)."""
        return (budget * self.start_ratio).long() if torch.is_tensor(budget) else int(budget * self.start_ratio)

    def scores(self, view: PrefillView) -> torch.Tensor:
        start = self.start_tokens(self.decode_budget(view.keys.shape[1]))
        order = view.positions.float().masked_fill(view.positions < start, float("inf"))  # newer scores higher
        return order.expand(view.keys.shape[0], -1)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        return {"cam_attention": view.column_sums}

    def merge(self, view: PrefillView, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        values, attention = view.values.float().clone(), view.column_sums       # [H, S, D], [H, S]
        (H, S), m = keep.shape, self.merge_budget
        # token i merges into slots first = i + 1 .. end - 1 (slot order is position order at prefill)
        first = torch.arange(1, S + 1, device=keep.device)
        end = (first + m).clamp(max=S)
        count = end - first                                                      # [S] m', 0 for the last
        csum = torch.nn.functional.pad(attention.cumsum(dim=1), (1, 0))          # csum[:, j] = sum of A[:, :j]
        p = merge_probability(attention, (csum[:, end] - csum[:, first]) / count)
        heads = view.head_ids(H, keep.device)[:, None]  # global heads: the draw is tp=1's (RankHeads)
        draw = (hashed_uniform(self.seed, view.layer, heads, view.positions[None, :]) < p) & ~keep & (count > 0)
        share = draw / count.clamp(min=1)                                        # [H, S]
        for i in share.any(dim=0).nonzero().flatten().tolist():                 # oldest first: carried on
            values[:, i + 1:i + 1 + m] += share[:, i, None, None] * values[:, i, None]
        return {"v": values}

    def decode_scores(self, probs, state, step: DecodeStep):
        attention = state["cam_attention"] + probs.mean(dim=2)
        start = self.start_tokens(step.budgets)[:, None, None]
        order = step.key_positions.float().masked_fill(step.key_positions < start, float("inf"))
        return order, {"cam_attention": attention}

    def merge_evicted(self, victim, evicting, state, step: DecodeStep) -> dict[str, torch.Tensor]:
        values, attention, k_pos = step.values.float(), state["cam_attention"], step.key_positions
        at = victim[..., None]                                                   # [b, H, 1]
        evicted_pos = k_pos.gather(-1, at)
        after = step.visible & (k_pos > evicted_pos)
        nearest = k_pos.masked_fill(~after, torch.iinfo(k_pos.dtype).max).argsort(dim=-1)[..., :self.merge_budget]
        target = after.gather(-1, nearest)                                       # [b, H, m] a held token
        count = target.sum(-1)
        mean = (attention.gather(-1, nearest) * target).sum(-1) / count
        p = merge_probability(attention.gather(-1, at)[..., 0], mean)
        heads = step.head_ids(k_pos.shape[1], k_pos.device)[None, :]
        draw = (hashed_uniform(self.seed, step.layer, heads, evicted_pos[..., 0]) < p) & evicting & (count > 0)
        share = torch.zeros_like(attention).scatter(-1, nearest, target.float())      # 1 at each target
        share = share * (draw / count.clamp(min=1))[..., None]
        evicted_value = values.gather(-2, at[..., None].expand(-1, -1, 1, values.shape[-1]))  # [b, H, 1, D]
        return {"v": values + share[..., None] * evicted_value}
