"""buzz: sinks + a sliding window + older tokens thinned in segments, each keeping its heavy hitter.

Paper: BUZZ: Beehive-structured Sparse KV Cache with Segmented Heavy Hitters for Efficient LLM
Inference (Zhao, Fang, Li, Yang, He, 2024), arXiv 2410.23079; official code JunqiZhao888/buzz-llm
@ e6f5e3e (class BuzzKVCacheWithAccumulation in entry_function/eval_inside_forward/cache/
cache_entity_collection.py, the `buzz` run type of main_run.py). Per (layer, kv-head) the cache is
a beehive: the first `sink_size` tokens, the newest `window_size` (the current token's included),
and between them the older tokens ("other"), which grow until they pass a threshold T. Then a cut:
- the tokens a previous cut already kept (the old sample) are thinned by position, every
  ((stride + 1) // 2)-th kept, starting from the oldest, so repeated cuts thin them again and
  again (the far past grows sparser the older it is);
- the tokens that left the window since (the new part) are split by position into segments of
  `stride`, the first starting at the oldest, and each segment keeps its local heavy hitter: the
  token with the most accumulated attention (H2O's score: column sums of the prompt's attention,
  plus every decode query's), the oldest among equals.
Here the request's budget B is the most a head holds, so T = B - sink_size - window_size: the cut
comes when a head would hold B + 1, at prefill (a prompt longer than B) or at decode. A cut leaves
sink + ceil(old / ((stride+1)//2)) + ceil(new / stride) + window, fewer than B; the head then
grows again. `decode_budgets` is what the cut keeps (budgets_from_state), so the engine evicts
exactly the tokens the cut drops (scores: 1 kept, 0 dropped). Which tokens are old sample is a
slot field (`buzz_sampled`: 1 once a cut kept the token), and segments and thinning follow token
positions, never slot order, so a recompute after preemption repeats every choice.
Defaults: sink_size 4, window_size 160, stride 5, as the official config_eval_parameters.py
(start_size, recent_size, sample_stride); its sample_threshold 400 is a budget of 4 + 400 + 160
= 564.

What differs:
- The threshold is the budget minus sinks and window (the official code takes it as its own
  setting and holds sink + threshold + window + 1 at most before a cut, here B).
- GQA (the official code runs MHA Llama-2): the attention of the query heads sharing a kv-head
  is averaged, as nanokv's H2O.
- Positions stay the tokens' own (the official code re-numbers the cache, StreamingLLM's
  position shift).
- Scores accumulate in float32 (official: the model dtype); the official cut resets the
  scores of the sinks and old sample to 0, which nothing reads again, so they are kept here.
- A budget from `compression` at or below sink_size + window_size shrinks the window (then the
  sinks) to leave a threshold of one token; a `budget` there is refused.
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView

DROPPED, NEW, SAMPLED = -1, 0, 1  # buzz_sampled: dropped by this step's cut / never cut / kept by a cut


class BUZZ(DecodeEvictor):
    name = "buzz"
    description = "sinks + window + older tokens cut in segments keeping each one's heavy hitter (when full)"
    paper = "https://arxiv.org/abs/2410.23079"
    options = {
        "sink_size": (int, 4, "an integer >= 0 (the first tokens, never evicted)", lambda v: v >= 0),
        "window_size": (int, 160, "an integer >= 0 (the newest tokens, never evicted)", lambda v: v >= 0),
        "stride": (int, 5, "an integer >= 1 (the segment length a cut keeps one heavy hitter of)",
                   lambda v: v >= 1),
    }
    needs_column_sums = True
    budgets_from_state = True  # a cut keeps fewer than the budget; the head then grows back
    slot_fields = {"buzz_score": torch.float32, "buzz_sampled": torch.int32}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_size + self.window_size:
            raise ValueError(f"budget={self.budget} must exceed sink_size + window_size = "
                             f"{self.sink_size + self.window_size} for buzz (the rest is the threshold "
                             f"the older tokens grow to before a cut)")

    def sizes(self, budget: torch.Tensor):
        """(sinks, window) for budgets [b]: the options, shrunk to leave a threshold of one token."""
        window = (budget - self.sink_size - 1).clamp(min=0, max=self.window_size)
        sinks = (budget - window - 1).clamp(min=0, max=self.sink_size)
        return sinks, window

    def recent_window(self, budget):
        return self.sizes(budget)[1]

    def cut(self, score, sampled, positions, held, newest, budget):
        """score, sampled, positions, held: [b, H, S]; newest, budget: [b] (the newest position,
        the request's budget). -> keep [b, H, S]: what each head keeps, everything held where it
        holds no more than its budget."""
        b, H, S = score.shape
        sinks, window = (x[:, None, None] for x in self.sizes(budget))
        sink = held & (positions < sinks)
        recent = held & (positions > newest[:, None, None] - window)
        other = held & ~sink & ~recent
        old, new = other & (sampled == SAMPLED), other & (sampled != SAMPLED)
        # the old sample, in position order: every ((stride + 1) // 2)-th from the oldest stays
        big = torch.iinfo(positions.dtype).max
        by_position = positions.masked_fill(~old, big).argsort(dim=-1, stable=True)
        rank = torch.empty_like(by_position).scatter_(-1, by_position, torch.arange(S, device=score.device)
                                                      .expand(b, H, S))
        thinned = old & (rank % ((self.stride + 1) // 2) == 0)
        # the new part, in segments of `stride` positions from its oldest: each keeps its best score
        first = positions.masked_fill(~new, big).amin(dim=-1, keepdim=True)
        segment = ((positions - first) // self.stride).clamp(0, S - 1).masked_fill(~new, S).long()  # S: not new
        best = torch.full((b, H, S + 1), float("-inf"), device=score.device)
        best = best.scatter_reduce(-1, segment, score.masked_fill(~new, float("-inf")), "amax")
        top = new & (score == best.gather(-1, segment))
        oldest = torch.full((b, H, S + 1), big, dtype=positions.dtype, device=score.device)
        oldest = oldest.scatter_reduce(-1, segment, positions.masked_fill(~top, big), "amin")
        heavy = top & (positions == oldest.gather(-1, segment))
        cutting = (held.sum(dim=-1, keepdim=True) > budget[:, None, None])
        return torch.where(cutting, sink | recent | thinned | heavy, held)

    def _prefill_keep(self, view: PrefillView) -> torch.Tensor:
        H, S = view.column_sums.shape
        budget = torch.tensor([self.layer_budget(S, view.layer, view.num_layers)], device=view.keys.device)
        new = torch.full((1, H, S), NEW, dtype=torch.int32, device=view.keys.device)
        held = torch.ones(1, H, S, dtype=torch.bool, device=view.keys.device)
        return self.cut(view.column_sums[None], new, view.positions.expand(1, H, S), held,
                        view.positions[-1:], budget)[0]

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        if view.keys.shape[1] <= self.layer_budget(view.keys.shape[1], view.layer, view.num_layers):
            return None
        return self._prefill_keep(view)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        H, S = view.column_sums.shape
        sampled = torch.zeros(H, S, dtype=torch.int32, device=view.keys.device)
        if S > self.layer_budget(S, view.layer, view.num_layers):  # what the prompt's cut kept of "other"
            budget = torch.tensor([self.layer_budget(S, view.layer, view.num_layers)], device=view.keys.device)
            sinks, window = (int(x) for x in self.sizes(budget))
            other = (view.positions >= sinks) & (view.positions <= view.positions[-1] - window)
            sampled = (self._prefill_keep(view) & other).int()
        return {"buzz_score": view.column_sums, "buzz_sampled": sampled}

    def decode_scores(self, probs, state, step):
        score = state["buzz_score"] + probs.mean(dim=2)
        keep = self.cut(score, state["buzz_sampled"], step.key_positions, step.visible, step.positions,
                        step.budgets)
        sinks, window = (x[:, None, None] for x in self.sizes(step.budgets))
        other = (step.key_positions >= sinks) & (step.key_positions <= step.positions[:, None, None] - window)
        cutting = step.visible.sum(dim=-1, keepdim=True) > step.budgets[:, None, None]
        sampled = torch.where(cutting & ~keep, DROPPED,
                              torch.where(cutting & keep & other, SAMPLED, state["buzz_sampled"]))
        return keep.float(), {"buzz_score": score, "buzz_sampled": sampled.int()}

    def decode_budgets(self, state, step):
        """What each head keeps: all it holds, less what this step's cut drops."""
        dropped = (state["buzz_sampled"] == DROPPED) & step.visible
        return step.visible.sum(dim=-1) - dropped.sum(dim=-1)
