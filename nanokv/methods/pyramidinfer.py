"""pyramidinfer: each layer keeps the context its recent queries attend to, fewer with depth.

Paper: PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM Inference (Yang et
al., ACL 2024 Findings), arXiv 2405.12532; official code mutonix/pyramidinfer @ 61ac641
(models/modeling_llama_pyramidinfer.py, LlamaModel.forward; configs/llama3_8b.json). Deeper
layers need fewer keys ("pivotal context", PvC), and the queries of the latest tokens agree on
which: the last R = 1 + int(recent_ratio n) prompt tokens are always kept, and each layer ranks
the older ones (the context) by the attention those R queries give them, averaged over every
query head of the layer, the queries weighted linearly from 1 (the oldest) to distance_weight
(the newest) and averaged; the first sink_tokens positions always win. Layer l keeps its top
tokens among those layer l - 1 kept (a dropped token never comes back), and the attention that
ranks them is a softmax over what that layer still holds, as in the official code, whose deeper
layers never see a dropped token. Every kv-head of a layer keeps the same tokens.

How many: the official shrinks the context after layer i by a factor r_i, cosine from 1 at layer
0 to prefill_decay_ratio at layer L: r_i = d + (1 - d) (cos(pi i / L) + 1) / 2, so layer l holds
a share prod_{i<l} r_i of the context. Here those products are the SHAPE of the allocation and
the request's budget its level: the L layers share L x (B - R) context tokens in proportion to
prod_{i<l} r_i, none above the context itself (what a capped layer cannot hold goes to the
others: cake.share_budgets), so the total is L x B as for every budgeted method and deeper
layers hold less.
Defaults (configs/llama3_8b.json and llama2_7b.json): recent_ratio=0.2, prefill_decay_ratio=0.9,
cosine, distance_weight=1.2, streamingllm_sink_len=4.

What differs:
- The budget sets the level (above); the official keeps int(context x r_i) after each layer
  whatever the budget, with a floor min_context_length=64 (not offered: the shares are the
  budget's). With R >= B (compression above 1 - recent_ratio) every layer keeps its newest B.
- The official layer l holds what the layers before it selected and selects for the next one
  (it drops those tokens' hidden states, so later layers never compute them); nanokv computes
  every token in every layer, so layer l keeps the selection its own attention makes among what
  layer l - 1 kept. The counts follow the official's shape (layer l holds prod_{i<l} r_i).
- Prefill only. The official generation stage re-compresses generated tokens in chunks of 16
  (gen_decay_ratio 0.1, gen_compress_ratio 0.9), but its bookkeeping mixes the tokens seen with
  the tokens a layer holds (seen_tokens vs past_kv_seq_lens), and its README says it leaves the
  prompt alone: not ported. Decode grows the cache as any prefill-only method's does.
- decay_strategy=linear is the official linear formula; the official code's if/if/else lets
  'linear' fall through to a constant ratio (a bug), which is not reproduced.
- Statistics in float32 (the official uses the model dtype).
"""

import math

import torch

from nanokv.methods.base import PrefillSelector, PrefillView
from nanokv.methods.cake import share_budgets


class PyramidInfer(PrefillSelector):
    name = "pyramidinfer"
    description = "pivotal context by the recent queries' distance-weighted attention, fewer per layer with depth"
    paper = "https://arxiv.org/abs/2405.12532"
    options = {
        "recent_ratio": (float, 0.2, "a number in [0, 1)", lambda v: 0 <= v < 1),
        "prefill_decay_ratio": (float, 0.9, "a number in (0, 1]", lambda v: 0 < v <= 1),
        "decay_strategy": (str, "cosine", "'cosine' or 'linear'", lambda v: v in ("cosine", "linear")),
        "distance_weight": (float, 1.2, "a number in (0, 100]", lambda v: 0 < v <= 100),
        "sink_tokens": (int, 4, "an integer >= 0", lambda v: v >= 0),
    }

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens={self.sink_tokens} for {self.name}")

    def decay(self, layer: int, num_layers: int) -> float:
        """r_layer: the share of its context layer `layer` passes on to the next."""
        d = self.prefill_decay_ratio
        if self.decay_strategy == "linear":
            return d + (1 - d) * (1 - layer / num_layers)
        return d + (1 - d) * (math.cos(math.pi * layer / num_layers) + 1) / 2

    def recent(self, n: int) -> int:
        """R: the newest prompt tokens every layer keeps (and whose queries rank the rest)."""
        return min(n, 1 + int(n * self.recent_ratio))

    def layer_budgets(self, n: int, num_layers: int) -> list[int]:
        """Tokens each layer keeps: the recent R and its share of L x (B - R) context tokens."""
        keep = self.tokens_to_keep(n)
        recent = self.recent(n)
        if keep >= n:
            return [n] * num_layers
        if recent >= keep:
            return [keep] * num_layers
        shape = [math.prod(self.decay(i, num_layers) for i in range(layer)) for layer in range(num_layers)]
        return [recent + c for c in share_budgets(shape, num_layers * (keep - recent), n - recent)]

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        return self.layer_budgets(n, num_layers)[layer]

    def context_scores(self, view: PrefillView, held: torch.Tensor, recent: int) -> torch.Tensor:
        """[S] the distance-weighted attention of the last `recent` queries, averaged over the
        query heads, over the tokens `held` [S] bool (the softmax over those alone); -inf where not
        held, +inf at the sinks."""
        H, S, D = view.keys.shape
        q = view.queries[-recent:].float()                                        # [R, Hq, D]
        keys = view.keys.float().repeat_interleave(q.shape[1] // H, dim=0)         # [Hq, S, D]
        logits = torch.einsum("rhd,hsd->hrs", q, keys) / math.sqrt(D)
        hidden = (view.positions[None, :] > view.positions[-recent:][:, None]) | ~held[None, :]
        attention = logits.masked_fill(hidden[None], float("-inf")).softmax(dim=-1)
        attention = view.all_heads(attention).mean(dim=0)  # [R, S] over every rank's query heads (RankHeads)
        weights = torch.linspace(1.0, self.distance_weight, recent, device=attention.device)
        scores = (weights[:, None] * attention).mean(dim=0)
        scores = scores.masked_fill(view.positions < self.sink_tokens, float("inf"))
        return scores.masked_fill(~held, float("-inf"))

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        budgets = self.layer_budgets(S, view.num_layers)
        keep = budgets[view.layer]
        if keep >= S:
            return None
        recent = self.recent(S)
        held = view.sequence_state.get("pyramidinfer")
        if held is None:                                       # the first layer that compresses
            held = torch.ones(S, dtype=torch.bool, device=view.keys.device)
        if recent >= keep:                                     # no room for context: the newest keep
            chosen = torch.arange(S, device=view.keys.device) >= S - keep
        else:
            scores = self.context_scores(view, held, recent)
            scores[S - recent:] = float("inf")                 # the recent tokens stay
            chosen = torch.zeros(S, dtype=torch.bool, device=scores.device)
            chosen[scores.topk(keep).indices] = True
        view.sequence_state["pyramidinfer"] = chosen
        return chosen.expand(H, S).clone()
