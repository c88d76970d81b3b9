"""simlayerkv: "lazy" layers keep only sinks and recent tokens, the others keep everything.

Paper: SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction (Zhang et al., 2024),
arXiv 2410.13846. Some layers, for a given input, put nearly all of their attention on the
first tokens and the most recent ones, and stay that way while generating. Per layer, per
prompt: the last prompt token's softmax attention (averaged over all query heads) summed over
what a lazy layer would keep, the first `sink_tokens` and the recent window; above `threshold`
the layer is lazy and keeps just those (the same tokens in every head), otherwise it stays
whole. The request's budget (or 1 - compression of the prompt) is what a lazy layer keeps:
`sink_tokens` + the newest (budget - sink_tokens). Acts once, after prefill, as kvpress does;
generated tokens are kept.

Defaults: sink_tokens=4 (paper, official code sail-sg/SimLayerKV @ 1fb6bda, kvpress),
threshold=0.9 (the paper's value for Llama-3; it gives Llama-2 0.65, Mistral 0.8, Qwen 0.85).
kvpress's SimLayerKVPress (@ 8bb29b9) defaults to lazy_threshold=1.0, which never finds a lazy
layer. `compression=r` sets the lazy window from the prompt length; the paper's fixed window
(4 + 1024 for every prompt) is budget=1028.

`criterion=kvpress` measures as SimLayerKVPress does (n_last=1): with n_recent = budget -
sink_tokens + 1 (it keeps the newest n_recent - 1), the last token's attention on the first
sinks and on the n_recent tokens before the last one, the last token's attention to itself left
out. kvpress leaves prompts of at most sinks + n_recent + 1 tokens whole. With it the kept sets
equal kvpress's.
What differs:
- laziness is decided at prefill from the last prompt token (kvpress's n_last=1 stand-in); the
  official SimLayerKV-decode decides at the first decode step from the first generated token's
  attention on the sinks and the last 1024 keys, itself included, and keeps that token.
- the official code keeps 4 + the last 1024 however long the prompt (duplicating tokens when the
  cache is shorter); here a prompt within the budget stays whole.
"""

import torch

from nanokv.methods.base import PrefillView, observation_attention
from nanokv.methods.streaming_llm import StreamingLLM


class SimLayerKV(StreamingLLM):
    name = "simlayerkv"
    description = "lazy layers (last token's attention on sinks + recent above a threshold) keep only those; others whole"
    paper = "https://arxiv.org/abs/2410.13846"
    options = {"threshold": (float, 0.9, "a number in [0, 1]", lambda v: 0 <= v <= 1),
               **StreamingLLM.options,
               "criterion": (str, "kept", "'kept' or 'kvpress'", lambda v: v in ("kept", "kvpress"))}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens={self.sink_tokens} for simlayerkv")

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n  # whether a layer is lazy is only known from its attention: plan for it staying whole

    def lazy_mass(self, view: PrefillView, keep: int) -> float:
        """The last prompt token's attention, averaged over the query heads, on the sinks and
        the recent window of a lazy layer keeping `keep` tokens."""
        S = view.keys.shape[1]
        last = view.all_heads(observation_attention(view, 1)[:, 0]).mean(dim=0)  # [S] every rank's heads
        sinks = min(self.sink_tokens, S)
        start, end = S - (keep - sinks), S
        if self.criterion == "kvpress":  # the n_recent = keep - sinks + 1 tokens before the last
            start, end = S - 1 - (keep - sinks + 1), S - 1
        return float(last[:sinks].sum() + last[max(start, sinks):end].sum())

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        S = view.keys.shape[1]
        keep = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if keep >= S or (self.criterion == "kvpress" and S <= keep + 2):
            return None
        if self.lazy_mass(view, keep) <= self.threshold:
            return None
        return super().keep_mask(view)  # StreamingLLM's: the sinks and the newest tokens
