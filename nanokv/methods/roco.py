"""roco: evict the token with the lowest mean attention, among those whose attention is steady.

Paper: On the Efficacy of Eviction Policy for Key-Value Constrained Generative Language Model
Inference (Ren & Zhu, 2024), arXiv 2402.06262 (the seed list links 2406.12335 by mistake);
its policy RoCo ("robust cache omission"), code DRSY/EasyKV. Two parts:
- importance, the temporal attention score: the attention a token received averaged over the
  queries that could attend to it (a sum divided by a count, so a late token is not
  outscored by an early one merely for being seen by fewer queries); per (layer, kv-head), the
  query heads of a group averaged first (GQA);
- eviction scope: tokens whose attention varies a lot (high standard deviation over those same
  queries) may matter again, so they are kept out of the scope, as are the newest
  `recent_size`; the lowest mean inside the scope goes.
EasyKV's decode (its `roco` policy, `h2o_head_std_avg` in older logs) holds the budget B plus
one new token, leaves the newest 10 out of the scope and takes as the scope the B - int(0.3 B)
lowest standard deviations of the rest: int(0.3 B) + 1 tokens are outside it. Here the same
split holds for any number held: the newest `recent_size`, then the highest standard
deviations up to int(robust_ratio * B) + 1 in all, are kept; the scope keeps its highest means
up to B. During decode that evicts EasyKV's token. After the prompt it picks the prompt tokens
kept at once, with EasyKV's prefill (encoding) split: the first `sink_size` tokens are kept
too, and the share is `prefill_robust_ratio` (EasyKV's recent_ratio 0.1 there, its scope
B - int(0.1 B) - 4). Standard deviations that tie go to the newer token; during decode, means
that tie evict the older (the engine's rule).

Statistics live in slot fields (sum, sum of squares and count of the attention each token
received) and grow with every decode query. At prefill they come from the prompt's last
`window_size` queries (0: every prompt query, as EasyKV with keep_attention=True, which its
README recommends when memory allows).

Defaults from EasyKV (DRSY/EasyKV @ a1d71ca, easykv.py generate): recent_size=10,
robust_ratio=0.3 (decode), sink_size=4 (temp_length) and prefill_robust_ratio=0.1 (prefill).
What differs:
- the prompt is compressed once after prefill; EasyKV's prefill streams it in chunks of
  `stride` tokens, evicting `stride` after each (and otherwise scores with the queries after a
  budget-sized prefix).
- the budget covers prompt and generated tokens (EasyKV's auto mode, without its +stride);
  its decoding mode budgets only the generated tokens and keeps the prompt whole.
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, prompt_logits


def protect_highest(std: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor,
                    count: torch.Tensor) -> torch.Tensor:
    """[..., S] bool: among `candidates`, the `count` [...] highest `std` (ties: the newer)."""
    # every slot is ranked (a sort, not a top-k of the largest count): reading that count would make
    # a decode step on a GPU wait for it
    k = std.shape[-1]
    protected = torch.zeros_like(candidates)
    if k == 0 or count.numel() == 0:
        return protected
    # a float >= 0 orders as its bits do: one int64 key, std then position
    bits = (std.float().clamp(min=0) + 0.0).contiguous().view(torch.int32).long()
    key = ((bits << 31) | positions.long()).masked_fill(~candidates, -1)
    top = key.topk(k, dim=-1).indices                                            # best first
    ranked = (torch.arange(k, device=std.device) < count[..., None]).expand(top.shape)
    return protected.scatter(-1, top, ranked) & candidates


def mean_and_std(total, squares, count):
    count = count.clamp(min=1)
    mean = total / count
    return mean, (squares / count - mean ** 2).clamp(min=0).sqrt()


class RoCo(DecodeEvictor):
    name = "roco"
    description = "evict the lowest mean attention among tokens whose attention is steady (low std) (every step)"
    paper = "https://arxiv.org/abs/2402.06262"
    options = {
        "window_size": (int, 0, "an integer >= 0 (prompt queries scored at prefill; 0: all)", lambda v: v >= 0),
        "recent_size": (int, 10, "an integer >= 0 (the newest tokens, never evicted)", lambda v: v >= 0),
        "robust_ratio": (float, 0.3, "a number in [0, 1) (share of the budget outside the eviction scope: "
                                     "the recent tokens, then the highest std)", lambda v: 0 <= v < 1),
        "sink_size": (int, 4, "an integer >= 0 (the first tokens, kept at prefill)", lambda v: v >= 0),
        "prefill_robust_ratio": (float, 0.1, "a number in [0, 1) (robust_ratio at prefill)", lambda v: 0 <= v < 1),
    }
    slot_fields = {"roco_sum": torch.float32, "roco_squares": torch.float32, "roco_count": torch.float32}

    def recent_window(self, budget):
        return budget.clamp(max=self.recent_size)

    def protected(self, budget: torch.Tensor, ratio: float | None = None) -> torch.Tensor:
        """Tokens kept out of the scope for their standard deviation, besides the recent ones
        (and the sinks, at prefill)."""
        ratio = self.robust_ratio if ratio is None else ratio
        return ((budget * ratio).long() + 1 - self.recent_window(budget)).clamp(min=0)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        H, S, _ = view.keys.shape
        T = len(view.queries)
        first = T - min(T, self.window_size) if self.window_size else 0
        total, squares = (torch.zeros(H, S, device=view.keys.device) for _ in range(2))
        count = torch.zeros(S, device=view.keys.device)
        for start, logits in prompt_logits(view, first):
            probs = logits.softmax(dim=-1).view(H, -1, *logits.shape[1:]).mean(dim=1)    # [H, c, S]
            total += probs.sum(dim=1)
            squares += (probs ** 2).sum(dim=1)
            count += logits[0].isfinite().sum(dim=0)                                     # queries seeing each key
        return {"roco_sum": total, "roco_squares": squares, "roco_count": count.expand(H, S).contiguous()}

    def scores(self, view: PrefillView) -> torch.Tensor:
        state = self.state_of(view)
        mean, std = mean_and_std(state["roco_sum"], state["roco_squares"], state["roco_count"])
        H, S = mean.shape
        budget = torch.tensor(self.decode_budget(S), device=mean.device)
        recent = view.positions > view.positions[-1] - self.recent_window(budget)        # [S]
        recent |= view.positions < self.sink_size                                        # and the sinks
        keep = recent[None, :] | protect_highest(std, view.positions.expand(H, S), ~recent.expand(H, S),
                                                 self.protected(budget, self.prefill_robust_ratio).expand(H))
        return mean.masked_fill(keep, float("inf"))

    def decode_scores(self, probs, state, step):
        attention = probs.mean(dim=2)
        total = state["roco_sum"] + attention
        squares = state["roco_squares"] + attention ** 2
        count = state["roco_count"] + step.visible.float()
        mean, std = mean_and_std(total, squares, count)
        recent = self.recent_window(step.budgets)
        eligible = step.visible & (step.key_positions <= (step.positions - recent)[:, None, None])
        robust = protect_highest(std, step.key_positions, eligible, self.protected(step.budgets)[:, None])
        return mean.masked_fill(robust, float("inf")), {"roco_sum": total, "roco_squares": squares, "roco_count": count}
