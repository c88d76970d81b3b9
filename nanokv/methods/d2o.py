"""d2o: layer budgets from attention density; H2O eviction; evicted tokens merged when similar.

Paper: D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large
Language Models (Wan et al., ICLR 2025), arXiv 2406.13035, official code AIoT-MLSys-Lab/d2o.
Layer level: shallow layers attend densely and lose more by eviction, so each layer's budget
follows its attention density. Token level: H2O's heavy hitters plus a recent window, and an
evicted token that is close enough to one that stays is merged into it, not lost.

Layer l (official code): the variance over the prompt's tokens of each kv-head's attention
column sums, min-max normalised across the layer's heads and averaged: v_l in [0, 1]; budget
B_l = B x L x softmax(-v)_l. Per (layer, kv-head) the newest `recent_ratio` of B_l and the first
`sink_tokens` stay; the rest go by accumulated attention (prompt column sums plus each decode
query's attention, GQA averaged over the group), the lowest first, at prefill and then one per
decode step. An evicted key k_e finds its most similar kept key k_t (cosine s); it merges when s
reaches the threshold T, an EMA: T = mean of the max similarities at the first eviction, then
T = alpha T + beta s at each later one (updated before the test). Merging (the official
scatter mean): k_t <- (k_t + sum of s_e k_e) / (1 + number merged into t), the same weights
for v. T and B_l are per (layer, kv-head) values carried in slot fields (base.py).

Defaults (official code): alpha = beta = 0.5, sink_tokens=4, heavy and recent halves
(`--hh_ratio 0.1 --recent_ratio 0.1`). What differs: the engine compresses a layer when its
prefill ends, before later layers run, so the softmax runs over the layers seen so far
(B_l = B x (l + 1) x w_l / sum_{k<=l} w_k, w = exp(-v)): the last layer's budget is the
paper's, the earlier ones leave out the layers after them, and the request's total is near
L x B, not exactly it; the official code keeps layers 0, 1 and L-1 whole, here every layer is
compressed; selection, threshold and merge decision are per kv-head (the official code
decides per evicted index over the heads); a prompt within the budget is left whole in every
layer, which then holds the request's budget.
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import DecodeEvictor, DecodeStep, Merger, PrefillView, head_value


class D2O(DecodeEvictor, Merger):
    name = "d2o"
    description = "layer budgets from attention density; heavy + recent; evicted tokens merged into similar kept ones"
    paper = "https://arxiv.org/abs/2406.13035"
    options = {
        "recent_ratio": (float, 0.5, "a number in [0, 1) (share of a layer's budget kept for the newest tokens)",
                         lambda v: 0 <= v < 1),
        "sink_tokens": (int, 4, "an integer >= 0 (first tokens never evicted)", lambda v: v >= 0),
        "alpha": (float, 0.5, "a number in [0, 1] (weight of the previous threshold)", lambda v: 0 <= v <= 1),
        "beta": (float, 0.5, "a number in [0, 1] (weight of the new max similarity)", lambda v: 0 <= v <= 1),
    }
    needs_column_sums = True
    needs_values = True
    decode_reads = frozenset({"keys", "values"})
    slot_fields = {"d2o_score": torch.float32, "d2o_threshold": torch.float32, "d2o_budget": torch.int32}

    @staticmethod
    def density(column_sums: torch.Tensor) -> float:
        """v_l: each head's variance of its column sums, min-max normalised over the heads, averaged."""
        variance = column_sums.var(dim=-1)
        return float(((variance - variance.min()) / (variance.max() - variance.min() + 1e-6)).mean())

    def budget_of(self, view: PrefillView) -> int:
        """B_l, the layer's budget: B x (l + 1) x w_l / sum of w over the layers seen so far."""
        S = view.keys.shape[1]
        budget = self.decode_budget(S)
        if budget >= S:
            return budget
        seen = view.sequence_state.setdefault("d2o_weights", {})
        seen[view.layer] = math.exp(-self.density(view.column_sums))
        return min(S, max(1, int(budget * len(seen) * seen[view.layer] / sum(seen.values()))))

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """Each w is in [1/e, 1], so layer l's share is at most (l + 1) / (1 + l / e)."""
        budget = self.decode_budget(n)
        if not self.compresses or budget >= n:
            return n
        return min(n, math.ceil(budget * (layer + 1) / (1 + layer / math.e)))

    def protect(self, scores, positions, newest, budget):
        """Sinks and the newest recent_ratio of the budget score +inf (never evicted)."""
        recent = (budget * self.recent_ratio).long() if torch.is_tensor(budget) else int(budget * self.recent_ratio)
        keep = (positions < self.sink_tokens) | (positions > newest - recent)
        return scores.masked_fill(keep, float("inf"))

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        sums = view.column_sums
        return {"d2o_score": sums, "d2o_threshold": torch.full_like(sums, float("nan")),  # nan: no eviction yet
                "d2o_budget": torch.full_like(sums, self.budget_of(view), dtype=torch.int32)}

    def scores(self, view: PrefillView) -> torch.Tensor:
        budget = int(self.state_of(view)["d2o_budget"][0, 0])
        return self.protect(view.column_sums.clone(), view.positions, view.positions[-1], budget)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        budget = int(self.state_of(view)["d2o_budget"][0, 0])
        if budget >= view.keys.shape[1]:
            return None
        top = self.scores(view).topk(budget, dim=-1).indices
        return torch.zeros(view.keys.shape[:2], dtype=torch.bool, device=top.device).scatter_(1, top, True)

    def merge(self, view: PrefillView, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        keys, values = view.keys.float(), view.values.float()                  # [H, S, D]
        H, S, D = keys.shape
        unit = F.normalize(keys, dim=-1)
        similarity = (unit @ unit.transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))
        best, target = similarity.max(dim=-1)                                    # [H, S]: the most similar kept
        evicted = ~keep
        threshold = (best * evicted).sum(-1) / evicted.sum(-1)                   # [H] the first eviction's mean
        merging = evicted & (best >= threshold[:, None])
        return {"k": scatter_mean(keys, target, best, merging), "v": scatter_mean(values, target, best, merging),
                "d2o_threshold": threshold[:, None].expand(H, S)}

    def decode_scores(self, probs, state, step: DecodeStep):
        accumulated = state["d2o_score"] + probs.mean(dim=2)
        budget, threshold = head_value(state["d2o_budget"], step), head_value(state["d2o_threshold"], step)
        scores = self.protect(accumulated, step.key_positions, step.positions[:, None, None], budget[..., None])
        return scores, {"d2o_score": accumulated,  # the per-head values reach the new token's slot too
                        "d2o_budget": budget[..., None].expand_as(accumulated),
                        "d2o_threshold": threshold[..., None].expand_as(accumulated)}

    def decode_budgets(self, state, step: DecodeStep) -> torch.Tensor:
        return head_value(state["d2o_budget"], step).long()

    def merge_evicted(self, victim, evicting, state, step: DecodeStep) -> dict[str, torch.Tensor]:
        keys, values = step.keys.float(), step.values.float()                  # [b, H, S, D]

        def row(x, slot):                                                         # x at slot [b, H] -> [b, H, 1, D]
            return x.gather(-2, slot[..., None, None].expand(-1, -1, 1, x.shape[-1]))

        unit = F.normalize(keys, dim=-1)
        similarity = (unit * row(unit, victim)).sum(-1)                          # [b, H, S]
        others = step.visible.scatter(-1, victim[..., None], False)
        best, target = similarity.masked_fill(~others, float("-inf")).max(dim=-1)
        previous = head_value(state["d2o_threshold"], step)
        threshold = torch.where(previous.isnan(), best, self.alpha * previous + self.beta * best)
        merging = evicting & (best >= threshold)                                  # [b, H]
        # into the target t alone: k_t <- (k_t + s k_e) / 2
        into = torch.zeros_like(step.visible).scatter(-1, target[..., None], merging[..., None])[..., None]
        merged = {}
        for name, x in (("k", keys), ("v", values)):
            moved = (row(x, target) + best[..., None, None] * row(x, victim)) / 2
            merged[name] = torch.where(into, moved, x)
        merged["d2o_threshold"] = threshold[..., None].expand_as(similarity)
        return merged


def scatter_mean(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, merging: torch.Tensor) -> torch.Tensor:
    """x [H, S, D] with each slot t replaced by (x_t + sum of weight_e x_e over the merging e with
    target_e = t) / (1 + their number): the official code's scatter mean."""
    weight = torch.where(merging, weight, 0.0)
    added = torch.zeros_like(x).scatter_add_(1, target[..., None].expand_as(x), weight[..., None] * x)
    count = torch.ones_like(weight).scatter_add_(1, target, merging.float())
    return (x + added) / count[..., None]
