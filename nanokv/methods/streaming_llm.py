"""streaming_llm: attention sinks plus a recent window.

Paper: Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024),
arXiv 2309.17453. The first few tokens soak up attention whatever they say ("sinks"); keeping
them plus the most recent tokens keeps the model fluent. Keep `sink_tokens` first tokens and
fill the rest of the budget with the most recent ones. Default sink_tokens=4: start_size of the
official StartRecentKVCache (mit-han-lab/streaming-llm @ 2e50426), n_sink of kvpress's
StreamingLLMPress.

What differs:
- Compresses once, after prefill, as kvpress and KVCache-Factory do: generated tokens add to
  the budget. The official cache stays at sinks + recent while generating (the oldest non-sink
  goes each step); not done here because simlayerkv builds on this class and combinations with
  a quantizer (streaming_llm+kivi) need a prefill-time method.
- Positions stay those the tokens were written at (keys cached after RoPE), as in kvpress's
  StreamingLLMPress; the official code caches keys before RoPE and rotates them by their slot in
  the cache (kvpress's KeyRerotationPress does that).
- compression=r keeps ceil((1 - r) n); kvpress int(n (1 - r)) (base.py).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView


class StreamingLLM(PrefillSelector):
    name = "streaming_llm"
    description = "keep the first tokens (attention sinks) and the most recent ones"
    paper = "https://arxiv.org/abs/2309.17453"
    options = {"sink_tokens": (int, 4, "an integer >= 0", lambda v: v >= 0)}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens={self.sink_tokens} for streaming_llm")

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S = view.keys.shape[:2]
        recency = torch.arange(S, dtype=torch.float32, device=view.keys.device)  # later slots score higher
        recency[:self.sink_tokens] = float("inf")                     # sinks always win
        return recency.expand(H, S)
