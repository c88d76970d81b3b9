"""inf_mllm: keep the recent tokens and the "attention saddles" the recent queries keep attending to.

Paper: Inf-MLLM: Efficient Streaming Inference of Multimodal Large Language Models on a Single GPU
(Ning, Zhao, Jin, Ding, Guo; Shanghai Jiao Tong University and Fudan University, 2024), arXiv
2409.09086. In LLMs and MLLMs alike a few scattered tokens draw high attention over many decoding
steps ("attention saddles"); a size-constrained cache of the recent tokens plus those saddles
keeps streaming inference stable. Per (layer, kv-head) the cache holds a budget B: the newest R
tokens, and the B - R older tokens with the highest attention summed over the last R queries
(the attention of each query averaged over the query heads of its group, GQA), re-ranked at
every generated token; the prompt is cut to B at the end of prefill by its last R queries.
Default R = 32: ours (no public code; the paper tunes its cache sizes per model).

State: the last R queries' attention to every key, a ring of R slot fields (`infmllm_attn<k>`
holds the probabilities of the query whose position is k mod R; 4R bytes per token and head), so
that a query's share leaves the sum exactly R steps after it came (a running sum could not
subtract it without storing it).

What differs:
- No code is public: infly-ai/INF-MLLM (the repository lists cite) holds INF Tech's INF-MLLM
  model series, not this paper's runtime (checked at 0195e76: no KV-cache code in its history).
- The paper's "attention bias", which it adds so the cache moves on to newer tokens over
  multi-round streams, is left out: its formula (and whether it acts on the model's attention or
  only on the selection score) could not be read here (the paper's text was reachable only as
  its abstract and third-party summaries), and nanokv's attention kernels take no per-slot bias.
- The multimodal parts (video frames streamed in chunks) are outside a text engine: a long
  prompt is one prefill, then the rule runs at every generated token.
- Among equal sums the oldest token goes (the engine's tie rule).
"""

from nanokv.methods.query_ring import QueryRingEvictor


class InfMLLM(QueryRingEvictor):
    name = "inf_mllm"
    description = "recent tokens + attention saddles (highest attention summed over the last R queries), every step"
    paper = "https://arxiv.org/abs/2409.09086"
    options = {
        "window_size": (int, 32, "an integer >= 1 (R: the newest tokens, never evicted, whose queries' "
                                 "attention is summed)", lambda v: v >= 1),
    }

    ring_prefix = "infmllm_attn"

    def ring_size(self) -> int:
        return self.window_size

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for inf_mllm "
                             f"(the budget holds the recent tokens and the saddles)")

    def recent_window(self, budget):
        return budget.clamp(max=self.window_size)
