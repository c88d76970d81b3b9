"""lazyllm: prune the prompt progressively in depth: at a few layers, the tokens the last prompt token attends to least stop going on.

Paper: LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference (Fu, Cho, Merth,
Mehta, Rastegari, Najibi; Apple, 2024), arXiv 2407.14057 (preprint; no official code released).

Algorithm: a token's importance at layer l is the attention the prompt's last token
gives it at that layer, averaged over the attention heads. At a pruning layer, the tokens whose
importance falls under a percentile of those still present are dropped: their hidden states do
not go on, so the layers after it neither compute nor cache them (the KV they left in the
layers they reached stays). Pruning is progressive: more tokens go at later pruning layers,
since the paper's ablation over where and how much to prune finds later layers less sensitive.
The prompt's last token always goes on (the first generated token is read from it).

In nanokv (Method.narrows): at pruning layer l_s, `propagate` keeps the top k_s of the tokens
still present by that score (the last one always), and the engine's `narrow` drops the rest
before layer l_s + 1. Nothing is evicted at a layer a token reached (keep_mask keeps all).

Schedule: `stages` pruning layers l_s = s * L // (stages + 1), s = 1 .. stages (distinct ones
before the last layer: a later one would prune nothing). The request's budget (`budget=B`, or
`compression=r`: B = ceil((1 - r) n)) is what the last stage keeps, the tokens the deepest
layers compute; the stages between fall evenly from the prompt's n: after stage s of m,
k_s = n - floor(s (n - B) / m) go on (a layer-dependent percentile 1 - k_s / k_{s-1}).

Defaults: stages=3 (pruning at 1/4, 1/2 and 3/4 of the depth: layers 8, 16, 24 of a 32-layer
Llama 2 7B) (≈ re-check). The paper prunes at a few layers with percentiles rising with depth
(its method section and its progressive-pruning figure); the exact layers and percentiles of its
LongBench runs could not be read here and no official code exists, so the even spacing, the
even fall of the kept counts and the budget as the last stage's keep are nanokv's choices.

Prefill attention FLOPs against full's: layer l attends its N_l queries over their N_l keys
(causal), about 2 * 2 * N_l^2 / 2 * Hq * D each; full has N_l = n in every layer, so the ratio is
sum_l N_l^2 / (L n^2), with N_l = n up to l_1 and k_s from l_s + 1 on (the MLPs and projections
fall as sum_l N_l / (L n)).

What differs:
- Revival (the Aux Cache) is not built: a pruned token never comes back. The paper saves a
  pruned token's hidden state at the layer it was pruned from (the Aux Cache) and, when a later
  step's attention would need it at a deeper layer, computes its KV there from that state. Here
  the deeper layers of every later step see only the tokens that went on; their KV is held,
  the pruned ones' is not: a static pruning in depth, as FastKV's. Revival needs an engine hook
  that keeps each pruned token's hidden state (and position) per pruning layer, and lets a decode
  step run the layers after it for the tokens it revives.
- The paper re-decides at every generation step (the decoding stage prunes too); here only the
  prompt's prefill prunes, and decode steps attend over what each layer holds.
- With a (context, question) prompt the score is the last context token's attention (the part
  nanokv compresses ends there); the paper's last token is the whole prompt's.
- Attention scores in float32; GQA: the mean over all query heads of the layer (every kv-head
  then holds the same tokens, as in the paper's multi-head models).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention


class LazyLLM(PrefillSelector):
    name = "lazyllm"
    description = "progressive prompt pruning in depth: at a few layers the tokens the last one attends to least stop"
    paper = "https://arxiv.org/abs/2407.14057"
    narrows = True
    options = {
        "stages": (int, 3, "an integer >= 1 (pruning layers, spread evenly in depth)", lambda v: v >= 1),
    }

    def pruning_layers(self, num_layers: int) -> list[int]:
        """The layers whose attention prunes, in order: stage s at s * L // (stages + 1)."""
        layers = {s * num_layers // (self.stages + 1) for s in range(1, self.stages + 1)}
        return sorted(layer for layer in layers if layer < num_layers - 1)

    def stage_keeps(self, n: int, num_layers: int) -> list[int]:
        """Tokens that go on after each pruning layer of an n-token prompt: falling evenly to the
        request's budget."""
        stages, kept = len(self.pruning_layers(num_layers)), self.tokens_to_keep(n)
        return [n - s * (n - kept) // stages for s in range(1, stages + 1)]

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        return None  # a pruned token's KV stays in the layers it reached

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        held = n
        for at, keep in zip(self.pruning_layers(num_layers), self.stage_keeps(n, num_layers)):
            if layer > at:
                held = keep
        return held

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[S] the last prompt token's attention to each cached token, averaged over the query heads."""
        return view.all_heads(observation_attention(view, 1)[:, 0]).mean(dim=0)  # every rank's heads (RankHeads)

    def propagate(self, view: PrefillView) -> torch.Tensor | None:
        # the prompt's length: the first layer sees every token (sequence_state lives one forward pass)
        n = view.sequence_state.setdefault("prompt_tokens", len(view.queries))
        layers = self.pruning_layers(view.num_layers)
        if view.layer not in layers:
            return None
        keep = self.stage_keeps(n, view.num_layers)[layers.index(view.layer)]
        T, S = len(view.queries), view.keys.shape[1]
        if keep >= T:
            return None
        scores = self.scores(view)[S - T:].clone()  # the queries' own slots: the last T
        scores[-1] = float("inf")  # the last token always goes on
        top = scores.topk(keep).indices
        return torch.zeros(T, dtype=torch.bool, device=scores.device).scatter_(0, top, True)
