"""cake: per-layer budgets from each layer's attention dispersion and shift, set in cascade, held
while generating.

Paper: CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences (Qin et al.,
ICLR 2025), arXiv 2503.12491; official code antgroup/cakekv @ c4675ce (cake/model/
modify_llama.py, cake/cake_cache.py, cake/utils.py). Layers differ in how widely their attention
spreads (spatial dispersion) and how much it moves between queries (temporal shift), so the
request's total budget L x B is sliced by each layer's preference.

With A [Hq, W, S] the softmax attention of the last W prompt queries (the window) over all S
cached keys, and A_p = A[:, :, :P] its columns over the P = S - W older tokens (not renormalised):
    H = -sum A_p log(A_p + 1e-10)        one sum over every query head, window query and token
    V = sum of var_w(A_p)                the unbiased variance across the window's queries
    P_l = H^(1/tau1) x V^(1/tau2)        the layer's preference
Token score per kv-head: mean_w(A_p) + gamma x var_w(A_p), average-pooled (kernel_size, the
padding counted in the average: F.avg_pool1d's default), averaged over the query heads of its
group (GQA); the window is always kept, outside the budget. Nothing is compressed while the
prompt is within B + W tokens.

Cascade: when layer l has been prefilled, the layers seen so far share the whole prefix budget
L x (B - W): each gets floor(L x (B - W) x P_m / sum_{k<=l} P_k), at most its P tokens; what a
capped layer cannot hold goes evenly to the others, and a last adjustment makes the shares sum
to the total (the official adjust_budgets); a layer keeps W + its share. A layer seen earlier
keeps its top tokens by its own scores among those it holds (`earlier_keep_masks`), and its
decode budget follows its share (`earlier_prefill_state`, base.py).

Decode: every (layer, head) holds its budget (W + share; B in every layer when the prompt was
not compressed). Each step scores the current query's attention over the older slots (all but
the newest W), average-pooled the same way along their positions and averaged over the group,
and evicts the lowest (nothing accumulates across steps); the newest W are never evicted.

What differs from the official code: statistics are float32 (the official variance runs in
fp16/bf16); decode pooling runs along positions (the official pools along slots, which after an
eviction lie in top-k order). A prompt of B < n <= B + W tokens, left whole at prefill, is cut to
B at the first decode step, as the official (the engine evicts what a head holds over its budget
in one step). A recompute's generated tokens (and a question after a
compressed context) run after the cascade, over every layer as it ends (base.py).
Defaults (official pred_cake.py): window_size=32, kernel_size=5 (hard-coded there), gamma=200,
tau1=tau2=1 (the official falls back to 1/1; its model2tau.json tunes them per model and budget,
e.g. 1.6/0.4 for Llama-3.1-8B at B=1024: pass them as options).
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import (DecodeEvictor, DecodeStep, PrefillView, head_value, observation_attention,
                                 top_per_head)

WINDOW_SCORE = 1e6  # above any mean + gamma x variance of attention (at most 1 + gamma / 2)


def share_budgets(preferences: list[float], total: int, cap: int) -> list[int]:
    """Integer shares of `total` proportional to `preferences`, none above `cap`: the floors, then
    what capped layers could not take spread evenly over the others (the first in layer order get
    the remainder), then the sum set to the total the same way (official adjust_budgets)."""
    weight = sum(preferences)
    budgets = [int(total * p / weight) if weight > 0 else total // len(preferences) for p in preferences]
    excess = sum(max(b - cap, 0) for b in budgets)
    budgets = [min(b, cap) for b in budgets]

    def spread(amount: int, eligible: list[int], sign: int):
        if eligible:
            each, extra = divmod(amount, len(eligible))
            for j, i in enumerate(eligible):
                budgets[i] += sign * (each + (j < extra))

    if excess > 0:
        spread(excess, [i for i, b in enumerate(budgets) if b < cap], 1)
    diff = total - sum(budgets)
    if diff > 0:
        spread(diff, [i for i, b in enumerate(budgets) if b < cap], 1)
    elif diff < 0:
        spread(-diff, [i for i, b in enumerate(budgets) if b > 1], -1)
    return [min(b, cap) for b in budgets]


class CAKE(DecodeEvictor):
    name = "cake"
    description = "layer budgets from attention entropy x variance, set in cascade and held while generating"
    paper = "https://arxiv.org/abs/2503.12491"
    budgets_from_state = True  # each layer's own budget, a slot field
    options = {
        "window_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
        "kernel_size": (int, 5, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
        "gamma": (float, 200.0, "a number in [0, 1e5]", lambda v: 0 <= v <= 1e5),
        "tau1": (float, 1.0, "a number > 0", lambda v: v > 0),
        "tau2": (float, 1.0, "a number > 0", lambda v: v > 0),
    }
    trims_earlier_layers = True
    slot_fields = {"cake_budget": torch.int32}  # the layer's decode budget, the same in each of its slots

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name}")

    def compresses_prompt(self, n: int) -> bool:
        return self.compresses and n > self.decode_budget(n) + self.window_size

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """The most the earlier layers hold together at any point of the cascade is the request's
        total L x B: planned as L x B / (L - 1) for each layer but the last (the whole one)."""
        if not self.compresses_prompt(n):
            return n
        return min(n, math.ceil(self.decode_budget(n) * num_layers / max(1, num_layers - 1)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average pooling along the last dim, the zero padding counted (F.avg_pool1d's default)."""
        k = self.kernel_size
        return F.avg_pool1d(x.reshape(-1, 1, x.shape[-1]), k, stride=1, padding=k // 2).view(x.shape)

    def preference_and_scores(self, view: PrefillView) -> tuple[float, torch.Tensor]:
        """(the layer's preference P_l, token scores [H, S]; the window's above every other, the
        newest highest)."""
        H, S, _ = view.keys.shape
        window = min(self.window_size, S - 1)
        prefix = observation_attention(view, window)[:, :, :S - window]        # [Hq, W, P]
        variance = prefix.var(dim=1, correction=1 if window > 1 else 0)        # [Hq, P] across the window
        # the layer's sums over every query head: each rank's heads' (RankHeads), exchanged
        entropy = view.all_heads(-(prefix * (prefix + 1e-10).log()).sum(dim=(1, 2))).sum()
        preference = float(entropy.pow(1 / self.tau1) * view.all_heads(variance.sum(dim=1)).sum().pow(1 / self.tau2))
        token = prefix.mean(dim=1) + self.gamma * variance                     # [Hq, P]
        token = self.pool(token.view(H, -1, S - window).mean(dim=1))           # GQA mean; pooling is linear
        recent = WINDOW_SCORE + torch.arange(window, dtype=token.dtype, device=token.device)
        return preference, torch.cat([token, recent.expand(H, window)], dim=1)

    def scores(self, view: PrefillView) -> torch.Tensor:
        return self.preference_and_scores(view)[1]

    def cascade_budgets(self, preferences: list[float], n: int, num_layers: int) -> list[int]:
        """Tokens each layer seen so far keeps (its window and its share), given their preferences."""
        average = self.decode_budget(n)
        window = min(self.window_size, average)
        shares = share_budgets(preferences, num_layers * (average - window), n - window)
        return [window + share for share in shares]

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """Runs the cascade for this layer (the engine asks for the state before the keep mask)
        and gives its slots the layer's budget."""
        H, S = view.keys.shape[:2]
        budget = self.decode_budget(S)
        if self.compresses_prompt(S):
            state = view.sequence_state.setdefault("cake", {"preference": [], "scores": [], "kept": [],
                                                            "layers": [], "written": []})
            preference, scores = self.preference_and_scores(view)
            state["preference"].append(preference)
            state["scores"].append(scores)
            state["layers"].append(view.layer)
            state["budgets"] = self.cascade_budgets(state["preference"], S, view.num_layers)
            state["kept"].append(top_per_head(scores, state["budgets"][-1]))
            state["written"].append(state["budgets"][-1])
            budget = state["budgets"][-1]
        return {"cake_budget": torch.full((H, S), budget, dtype=torch.int32, device=view.keys.device)}

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        self.state_of(view)
        state = view.sequence_state.get("cake")
        if state is None or state["layers"][-1] != view.layer or state["budgets"][-1] >= view.keys.shape[1]:
            return None
        return state["kept"][-1]

    def earlier_keep_masks(self, view: PrefillView) -> dict[int, torch.Tensor]:
        state = view.sequence_state.get("cake")
        if state is None or state["layers"][-1] != view.layer:
            return {}
        masks = {}
        for i, (layer, budget) in enumerate(zip(state["layers"][:-1], state["budgets"][:-1])):
            held = state["kept"][i]                                     # [H, S] what the layer holds now
            count = int(held[0].sum())
            if budget >= count:
                continue
            new = top_per_head(state["scores"][i].masked_fill(~held, float("-inf")), budget)
            masks[layer] = new[held].view(held.shape[0], count)          # over the held tokens, in slot order
            state["kept"][i] = new
        return masks

    def earlier_prefill_state(self, view: PrefillView) -> dict[int, dict[str, torch.Tensor]]:
        state = view.sequence_state.get("cake")
        if state is None or state["layers"][-1] != view.layer:
            return {}
        fields = {}
        for i, (layer, budget) in enumerate(zip(state["layers"][:-1], state["budgets"][:-1])):
            if budget != state["written"][i]:
                H, held = state["kept"][i].shape[0], int(state["kept"][i][0].sum())
                fields[layer] = {"cake_budget": torch.full((H, held), budget, dtype=torch.int32,
                                                           device=view.keys.device)}
                state["written"][i] = budget
        return fields

    def recent_window(self, budget: torch.Tensor) -> torch.Tensor:
        return budget.clamp(max=self.window_size)

    def decode_budgets(self, state: dict[str, torch.Tensor], step: DecodeStep) -> torch.Tensor:
        return head_value(state["cake_budget"], step).long()

    def decode_scores(self, probs, state, step: DecodeStep):
        attention = probs.mean(dim=2)                                     # [b, H, S] GQA mean
        newest = (step.positions - self.recent_window(step.budgets))[:, None, None]
        older = step.visible & (step.key_positions <= newest)
        # pool along positions: the older slots in position order first, then zeros (the padding)
        order = step.key_positions.masked_fill(~older, torch.iinfo(step.key_positions.dtype).max).argsort(dim=-1)
        pooled = self.pool(attention.masked_fill(~older, 0.0).gather(-1, order))
        scores = torch.empty_like(pooled).scatter_(-1, order, pooled)
        budget = head_value(state["cake_budget"], step)
        return scores, {"cake_budget": budget[..., None].expand_as(scores)}
