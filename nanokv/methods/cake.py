"""cake: per-layer budgets from each layer's attention dispersion and shift, set in cascade.

Paper: CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences (Qin et al.,
ICLR 2025), arXiv 2503.12491. Layers differ in how widely their attention spreads (spatial
dispersion) and how much it moves between queries (temporal shift), so the request's total
budget B_total = L x B is sliced by each layer's preference. With A [W, P] a query head's
softmax attention of the last W prompt queries (the window) over the P tokens before them:
H = -sum A log A (the window's entropy), V = sum over the tokens of the variance of A across the
window queries; a layer's preference is P_l = H^(1/tau1) x V^(1/tau2), averaged over its query
heads. Token score per kv-head: mean + gamma x variance of A across the window queries,
averaged over the query heads of the group (GQA), average-pooled (kernel_size); the window is
always kept.

Cascade: when layer l has been prefilled, every layer m <= l gets W + floor(L x (B - W) x
P_m / sum_{k<=l} P_k) tokens (at most the prompt): the prefix budget L x (B - W) is shared
over the layers seen so far, so what the request holds never exceeds its total, and a layer
seen earlier only shrinks as later layers arrive (its own scores pick what it keeps, so the
final keep-sets are those of allocating all budgets after the last layer). The engine compacts
the earlier layers again (`earlier_keep_masks`, base.py).

What differs from the paper: the window is outside the shared budget (each layer keeps its W
window tokens, the preferences share the rest); a layer capped at the prompt's length does not
hand its surplus to the others; the variance is the population variance (divide by W). A
recompute's generated tokens (and a question after a compressed context) run after the
cascade, over every layer as it ends (the engine's second pass, base.py).
Defaults: window_size=32, kernel_size=5 (average pooling), gamma=200 (paper); tau1=tau2=1
(the paper tunes them per model and budget, e.g. 1.6/0.4 for Llama-3.1-8B at 1024).
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention

WINDOW_SCORE = 1e6  # above any mean + gamma x variance of attention (at most 1 + gamma / 4)


class CAKE(PrefillSelector):
    name = "cake"
    description = "layer budgets from attention entropy x variance, set in cascade; score mean + gamma var"
    paper = "https://arxiv.org/abs/2503.12491"
    options = {
        "window_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
        "kernel_size": (int, 5, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
        "gamma": (float, 200.0, "a number in [0, 1e5]", lambda v: 0 <= v <= 1e5),
        "tau1": (float, 1.0, "a number > 0", lambda v: v > 0),
        "tau2": (float, 1.0, "a number > 0", lambda v: v > 0),
    }
    trims_earlier_layers = True

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name}")

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """The most the earlier layers hold together at any point of the cascade is the request's
        total L x B: planned as L x B / (L - 1) for each layer but the last (the whole one)."""
        if not self.compresses:
            return n
        average = self.tokens_to_keep(n)
        return min(n, math.ceil(average * num_layers / max(1, num_layers - 1)))

    def preference_and_scores(self, view: PrefillView) -> tuple[float, torch.Tensor]:
        """(the layer's preference P_l, token scores [H, S]; the window's above every other, the
        newest highest)."""
        H, S, _ = view.keys.shape
        window = min(self.window_size, S - 1)
        attention = observation_attention(view, window)[:, :, :S - window]    # [Hq, W, P]
        log = attention.clamp(min=1e-30).log()
        entropy = -(attention * log).sum(dim=(1, 2))                          # [Hq]
        variance = attention.var(dim=1, unbiased=False)                       # [Hq, P]
        shift = variance.sum(dim=1)
        preference = float((entropy.pow(1 / self.tau1) * shift.pow(1 / self.tau2)).mean())
        token = attention.mean(dim=1) + self.gamma * variance                 # [Hq, P]
        token = token.view(H, -1, S - window).mean(dim=1)                     # GQA: mean over the group
        pooled = F.avg_pool1d(token[:, None], self.kernel_size, stride=1, padding=self.kernel_size // 2,
                              count_include_pad=False)[:, 0]
        recent = WINDOW_SCORE + torch.arange(window, dtype=pooled.dtype, device=pooled.device)
        return preference, torch.cat([pooled, recent.expand(H, window)], dim=1)

    def scores(self, view: PrefillView) -> torch.Tensor:
        return self.preference_and_scores(view)[1]

    def cascade_budgets(self, preferences: list[float], n: int, num_layers: int) -> list[int]:
        """Tokens each layer seen so far keeps, given their preferences."""
        average = self.tokens_to_keep(n)
        window = min(self.window_size, average)  # a budget under the window keeps its newest tokens
        prefix = num_layers * (average - window)
        total = sum(preferences)
        shares = [p / total if total > 0 else 1 / len(preferences) for p in preferences]
        return [min(n, window + int(prefix * share)) for share in shares]

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        if self.tokens_to_keep(S) >= S:
            return None
        state = view.sequence_state.setdefault("cake", {"preference": [], "scores": [], "kept": [], "layers": []})
        preference, scores = self.preference_and_scores(view)
        state["preference"].append(preference)
        state["scores"].append(scores)
        state["layers"].append(view.layer)
        budgets = self.cascade_budgets(state["preference"], S, view.num_layers)
        state["budgets"] = budgets
        mask = self.top(scores, budgets[-1])
        state["kept"].append(mask)
        return None if budgets[-1] >= S else mask

    @staticmethod
    def top(scores: torch.Tensor, k: int) -> torch.Tensor:
        top = scores.topk(min(k, scores.shape[1]), dim=-1).indices
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, top, True)

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
            new = self.top(state["scores"][i].masked_fill(~held, float("-inf")), budget)
            masks[layer] = new[held].view(held.shape[0], count)          # over the held tokens, in slot order
            state["kept"][i] = new
        return masks
