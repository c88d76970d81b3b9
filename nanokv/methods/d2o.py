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

Defaults (official code @ 12c99d8): alpha = beta = 0.5, sink_tokens=4, heavy and recent halves
(`--hh_ratio 0.1 --recent_ratio 0.1`).

Layer allocation, two choices (`allocation`):
- "seen" (the default): each layer is compressed as its prefill ends, before later layers run,
  so the softmax runs over the layers seen so far (B_l = B x (l + 1) x w_l / sum_{k<=l} w_k,
  w = exp(-v)): the last layer's budget is the paper's, the earlier ones leave out the layers
  after them, and the request's total is ~0.8-0.93 of L x B; every layer is compressed. The
  cache never holds a whole prompt in every layer at once.
- "official": as the official code (modeling_llama3_new.py), w = softmax(-v) over all L layers
  and B_l = L w_l B tokens, at least 1% and at most all of the prompt (the official clamps
  L rho w_l to [0.01, 1], its B being rho (n + 1)); layers 0, 1 and L-1 are never compressed (they keep
  their share of the softmax). Every layer stays whole until the last one's prefill, which
  compresses and merges the middle ones (earlier_keep_masks), so a prefill holds the whole prompt.
What differs in both: the official code starts evicting at the first decode step, from budgets
that are ratios of n + 1 (sizes int(ratio x (n + 1)) for heavy and recent apiece); here at the
end of prefill, from the request's budget in tokens; selection, threshold and merge decision are
per kv-head (the official code decides per evicted index over the heads); a prompt within the
budget is left whole in every layer, which then holds the request's budget.
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import DecodeEvictor, DecodeStep, Merger, PrefillView, head_value, top_per_head

WHOLE = torch.iinfo(torch.int32).max  # the budget of a layer the official allocation never compresses


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
        "allocation": (str, "seen", "'seen' (softmax over the layers seen so far, each compressed as its "
                       "prefill ends) or 'official' (over all layers; layers 0, 1 and L-1 whole)",
                       lambda v: v in ("seen", "official")),
    }
    needs_column_sums = True
    needs_values = True
    decode_reads = frozenset({"keys", "values"})
    budgets_from_state = True  # each layer's own budget, a slot field
    slot_fields = {"d2o_score": torch.float32, "d2o_threshold": torch.float32, "d2o_budget": torch.int32}

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        # the official allocation needs every layer's density first: the last layer's prefill
        # compresses the others (earlier_keep_masks), and what follows the prompt waits (base.py)
        self.trims_earlier_layers = self.allocation == "official"

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
        seen[view.layer] = math.exp(-self.density(view.all_heads(view.column_sums)))  # over every rank's heads
        return min(S, max(1, int(budget * len(seen) * seen[view.layer] / sum(seen.values()))))

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """Each w is in [1/e, 1], so layer l's share is at most (l + 1) / (1 + l / e); the
        official allocation holds every layer whole until the last one's prefill."""
        budget = self.decode_budget(n)
        if not self.compresses or budget >= n or self.allocation == "official":
            return n
        return min(n, math.ceil(budget * (layer + 1) / (1 + layer / math.e)))

    def official_budgets(self, densities: list[float], n: int) -> list[int]:
        """The official allocation: w = softmax(-v) over all L layers, layer l keeping
        clamp(L w_l, 0.01, 1) of the tokens the request's budget B is the share of (B = rho (n + 1)
        there); layers 0, 1 and L - 1 are never compressed (they keep their softmax share all the
        same): their budget is the int32 maximum."""
        L, budget = len(densities), self.decode_budget(n)
        w = torch.tensor(densities, dtype=torch.float64, device="cpu").neg().softmax(0)  # L host numbers
        budgets = [min(n, max(math.ceil(0.01 * n), int(L * float(w_l) * budget))) for w_l in w]
        return [WHOLE if layer in (0, 1, L - 1) else b for layer, b in enumerate(budgets)]

    def protect(self, scores, positions, newest, budget):
        """Sinks and the newest recent_ratio of the budget score +inf (never evicted)."""
        recent = (budget * self.recent_ratio).long() if torch.is_tensor(budget) else int(budget * self.recent_ratio)
        keep = (positions < self.sink_tokens) | (positions > newest - recent)
        return scores.masked_fill(keep, float("inf"))

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        sums = view.column_sums
        if self.allocation == "official":
            budget = self.decode_budget(view.keys.shape[1])
            if budget < view.keys.shape[1]:  # compressed once every layer is seen: until then, whole
                layers = view.sequence_state.setdefault("d2o", {})
                layers[view.layer] = (self.density(view.all_heads(sums)), view)
                budget = WHOLE
        else:
            budget = self.budget_of(view)
        return {"d2o_score": sums, "d2o_threshold": torch.full_like(sums, float("nan")),  # nan: no eviction yet
                "d2o_budget": torch.full_like(sums, budget, dtype=torch.int32)}

    def scores(self, view: PrefillView, budget: int | None = None) -> torch.Tensor:
        budget = int(self.state_of(view)["d2o_budget"][0, 0]) if budget is None else budget
        return self.protect(view.column_sums.clone(), view.positions, view.positions[-1], budget)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        budget = int(self.state_of(view)["d2o_budget"][0, 0])
        return None if budget >= view.keys.shape[1] else top_per_head(self.scores(view, budget), budget)

    def earlier_keep_masks(self, view: PrefillView) -> dict[int, torch.Tensor]:
        """The official allocation, at the last layer's prefill: every layer's budget from all the
        densities; each layer over budget keeps its top tokens and merges the rest (as `merge`)."""
        layers = view.sequence_state.get("d2o")
        if layers is None or view.layer != view.num_layers - 1:
            return {}
        budgets = self.official_budgets([layers[l][0] for l in range(view.num_layers)], view.keys.shape[1])
        masks, fields = {}, {}
        for layer, budget in enumerate(budgets[:-1]):  # the last layer is this one, kept whole
            earlier = layers[layer][1]
            H, S, D = earlier.keys.shape
            state = {"d2o_budget": torch.full((H, S), budget, dtype=torch.int32, device=earlier.keys.device)}
            if budget < S:
                keep = top_per_head(self.scores(earlier, budget), budget)
                state |= self.merge(earlier, keep)  # (the scores move with their tokens)
                masks[layer] = keep
                state = {name: value[keep].view(H, budget, *value.shape[2:]) for name, value in state.items()}
            fields[layer] = state
        view.sequence_state["d2o_fields"] = fields
        return masks

    def earlier_prefill_state(self, view: PrefillView) -> dict[int, dict[str, torch.Tensor]]:
        return view.sequence_state.pop("d2o_fields", {})

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
