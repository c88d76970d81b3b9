"""dynamickv: layer budgets from where the window's top attention falls, re-allocated every m layers.

Paper: DynamicKV: Task-Aware Adaptive KV Cache Compression for Long Context LLMs (Zhou et al.,
2024), arXiv 2412.14838; official code DreamMr/DynamicKV @ 8ab3c08
(kv_compression/token_drop/methods/dynamic_v11.py, DynamicKVClusterV11;
llama_model_impl/dynamickv_v11.py; run/longbench/scripts/). Tasks differ in which layers their
important tokens sit in, so the budget follows the prompt's own attention instead of a fixed
pyramid. With B the average budget, W the window and base = B - W prefix tokens a layer:
- each layer scores its prefix like SnapKV (the last W queries' softmax attention, causal inside
  the window, summed over those queries, pooled along the prefix) and first keeps its top
  cap = min(int(radio_max x base), prefix) tokens per head, plus the window;
- every m layers (layer % m == m - 1) the layers seen so far re-share the WHOLE prefix budget
  L x base: the top L' x H x base scores over the L' layers' [H, prefix] maps together (L' the
  layers seen so far) are counted per layer, layer j gets floor(L x base x c_j / sum c) (the
  remainder to the newest layer), and keeps its top share among what it holds (never more than
  it holds: a dropped token does not come back). Earlier layers are compacted again
  (`earlier_keep_masks`, base.py), as in CAKE's cascade.
Every head of a layer keeps the same number, each its own tokens.
Defaults: window_size=8, kernel_size=7, avg pooling, radio_max=10 (run_llama3_8b_dynamic_v11.2_
max_radio_10.sh; the Mistral script max-pools), update_interval=4 (hard-coded `% 4 == 3`).

What differs:
- The last layer always re-allocates, so the total is L x base whatever L mod m (the official
  re-shares only at layer % 4 == 3: with L not a multiple of 4 its last layers keep cap each).
- Shares: one floor of L x base x c_j / sum c, the remainder to the newest layer; the official
  floors twice (budget_size x c_j / sum c, then rescaled) and divides the counts by L' first, so
  a share can differ by a few tokens. A share above what a layer holds is lost, as there.
- GQA: the official repeats the kv-heads and selects per query head (its cache Hq wide); here per
  kv-head, each query head's pooled scores averaged over its group (the counts over kv-heads).
- Scores in float32 (the official casts the softmax to the model dtype).
- A budget at most the window (only through compression) keeps the newest B tokens per layer.
- Prefill only (the official leaves decoding alone).

Memory: at worst, while layer j runs, the layers up to the last re-allocation hold L x base
plus their windows, and those after it cap + W each: kept_after_prefill plans for that peak.
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention, top_per_head


class DynamicKV(PrefillSelector):
    name = "dynamickv"
    description = "layer budgets re-shared every m layers by where the window's top attention falls"
    paper = "https://arxiv.org/abs/2412.14838"
    options = {
        "window_size": (int, 8, "an integer >= 1", lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
        "pooling": (str, "avg", "'avg' or 'max'", lambda v: v in ("avg", "max")),
        "radio_max": (float, 10.0, "a number >= 1", lambda v: v >= 1),
        "update_interval": (int, 4, "an integer >= 1", lambda v: v >= 1),
    }
    trims_earlier_layers = True

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name}")

    def sizes(self, n: int) -> tuple[int, int, int]:
        """(B, base = B - W, cap): the average budget, the prefix tokens a layer averages, and the
        most a layer first keeps of its prefix."""
        keep = self.tokens_to_keep(n)
        base = keep - self.window_size
        return keep, base, min(int(self.radio_max * base), n - self.window_size)

    def reallocates(self, layer: int, num_layers: int) -> bool:
        return layer % self.update_interval == self.update_interval - 1 or layer == num_layers - 1

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """The most the compacted layers hold together while a layer runs (module docstring),
        planned evenly over the L - 1 layers the scheduler counts as compacted."""
        keep, base, cap = self.sizes(n)
        if not self.compresses or keep >= n:
            return n
        if base <= 0 or num_layers == 1:
            return keep
        W, L, peak, last = self.window_size, num_layers, 0, -1
        for running in range(L):   # layers before `running` are compacted; `last`: their last re-share
            shared = 0 if last < 0 else min(L * base, (last + 1) * cap) + (last + 1) * W
            peak = max(peak, shared + (running - 1 - last) * (cap + W))
            if self.reallocates(running, L):
                last = running
        return min(n, math.ceil(peak / (L - 1)))

    def prefix_scores(self, view: PrefillView) -> torch.Tensor:
        """[H, P] the window's attention summed over its queries, pooled along the prefix per
        query head, averaged over each kv-head's group."""
        H, S, _ = view.keys.shape
        P = S - self.window_size
        attention = observation_attention(view, self.window_size).sum(dim=1)[:, :P]  # [Hq, P]
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(attention[:, None, :], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
        return pooled.view(H, -1, P).mean(dim=1)

    def shares(self, scores: list[torch.Tensor], base: int, num_layers: int) -> list[int]:
        """Prefix tokens each layer seen so far may keep: the whole L x base split by how many of
        the top L' x H x base scores (over those layers together) each layer has."""
        stacked = torch.stack(scores)                                       # [L', H, P]
        per_layer = stacked[0].numel()
        top = stacked.flatten().topk(min(len(scores) * stacked.shape[1] * base, stacked.numel())).indices
        counts = torch.bincount(top // per_layer, minlength=len(scores)).tolist()
        total = num_layers * base
        shares = [total * c // sum(counts) for c in counts]
        shares[-1] += total - sum(shares)
        return shares

    def layer_mask(self, scores: torch.Tensor, prefix: int, S: int) -> torch.Tensor:
        """[H, S] each head's top `prefix` of its prefix scores [H, P], and the window."""
        window = torch.ones(scores.shape[0], S - scores.shape[1], dtype=torch.bool, device=scores.device)
        return torch.cat([top_per_head(scores, prefix), window], dim=1)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        keep, base, cap = self.sizes(S)
        if keep >= S:
            return None
        if base <= 0:                                     # the budget within the window: the newest
            return (torch.arange(S, device=view.keys.device) >= S - keep).expand(H, S).clone()
        state = view.sequence_state.setdefault("dynamickv", {"layers": [], "scores": [], "prefix": [], "kept": [],
                                                             "retrim": {}})
        scores = self.prefix_scores(view)
        state["layers"].append(view.layer)
        state["scores"].append(view.all_heads(scores))  # every rank's heads: the layers' shares compare them
        state["prefix"].append(cap)
        state["retrim"] = {}
        if self.reallocates(view.layer, view.num_layers):
            for i, share in enumerate(self.shares(state["scores"], base, view.num_layers)):
                if share < state["prefix"][i]:
                    state["prefix"][i] = share
                    if i < len(state["kept"]):             # an earlier layer: re-trimmed after this one
                        state["retrim"][i] = state["kept"][i]
        state["kept"].append(self.layer_mask(scores, state["prefix"][-1], S))
        return state["kept"][-1]

    def earlier_keep_masks(self, view: PrefillView) -> dict[int, torch.Tensor]:
        state = view.sequence_state.get("dynamickv")
        if state is None or state["layers"][-1] != view.layer:
            return {}
        S, masks = view.keys.shape[1], {}
        for i, held in state["retrim"].items():                              # held [H, S]: what it holds now
            scores = view.own_heads(state["scores"][i])
            new = self.layer_mask(scores.masked_fill(~held[:, :scores.shape[1]], float("-inf")), state["prefix"][i], S)
            masks[state["layers"][i]] = new[held].view(held.shape[0], -1)    # over the held, in slot order
            state["kept"][i] = new
        return masks
