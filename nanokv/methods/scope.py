"""scope: compress the prompt once, then evict only among the generated tokens, on a budget of their own.

Paper: SCOPE: Optimizing Key-Value Cache Compression in Long-context Generation (Wu, Wang,
Zhang, Lai, He, Zhou; ACL 2025), arXiv 2412.13649; official code Linking-ai/SCOPE @ 8cbae48
(model/kv_utils.py SnapKVCluster / H2OKVCluster / ALLKVCluster, run_longgenbench_gsm8k.py).
Long outputs need the prompt's information all along, while the heavy hitters among the
generated tokens drift. So the two phases get separate budgets. The prompt is compressed once, at
prefill: a SnapKV selection to the request's budget (`compression` or `budget`; a budget at
least the prompt's length keeps it whole, the official ALLKV plug-in). It is never touched
again. Decode evicts only generated tokens, scoring them by the current query's attention
(not accumulated). The newest `decoding_recent_size` are always kept. Three strategies
(`decoding_metric`), with t = decode steps so far (0 at the first generated token's step):
- slide: the generated tokens hold `decoding_window_size`; each step past it evicts the one
  the current query attends to least.
- adaptive: they hold decoding_recent_size + t // delta, which grows one token every `delta` steps.
- discontinuous: the adaptive budget, but the heavy hitters are re-selected only every
  delta + 1 steps. The cache grows by one token a step in between, then is cut back in one step.
Each (layer, head) holds min(prompt, prefill budget) prompt tokens plus the decode budget.
Defaults:
- decoding_window_size 1024, decoding_recent_size 256, delta 15: the official init_H2O / init_snapkv
  defaults (kv_utils.py). The paper runs 512 and 1024 with 256. The run scripts set
  delta = (max_new_tokens - 256) // (decoding_window_size - 256), so the adaptive budget reaches
  decoding_window_size at the last token.
- prefill window_size 8, kernel_size 7, max pooling: run_longgenbench_gsm8k.py for SnapKV
  (the class defaults 32 / 5 / avgpool are overridden there).
- decoding_metric slide. The official default 'None' never evicts during decode, which is
  snapkv here.

What differs:
- Slots, not indices. The official code treats the first max_capacity_prompt cache entries as
  the prompt. When a prompt is shorter than that, decode tokens fall into that range. Here a
  prompt token is any position before the prompt length: its decode score is +inf, and each
  head holds exactly min(prompt, budget) of them.
- GQA: the official code repeats the kv-heads (a cache Hq wide) and selects per query head.
  Here the decode attention is averaged over each kv-head's group. The prefill is snapkv's
  (pooled per query head, then averaged).
- The current query attends before its step evicts; the official code compresses before the
  attention too, but that attention reads the uncompressed copy, so it is the same.
- The schedule's clock is the query's position minus the prompt length. The official counters
  are class attributes: the H2O cluster resets them at each prefill, the SnapKV cluster never
  does. The discontinuous phase starts at the first decode step. The official one starts when
  the cache first fills. Either way each cut comes every delta + 1 steps.
- A question kept whole after a compressed context (the engine's compress_len) counts as
  generated tokens: decode may evict it.
- Scores stay float32; the official softmax is cast back to the model dtype (near-ties).
"""

import torch

from nanokv.methods.base import DecodeEvictor
from nanokv.methods.snapkv import SnapKV

STRATEGIES = ("slide", "adaptive", "discontinuous")


class SCOPE(DecodeEvictor):
    name = "scope"
    description = "compress the prompt once (SnapKV), then evict only generated tokens on a decode budget of their own"
    paper = "https://arxiv.org/abs/2412.13649"
    options = {
        "decoding_metric": (str, "slide", "'slide', 'adaptive' or 'discontinuous' (the decode strategy)",
                            lambda v: v in STRATEGIES),
        "decoding_window_size": (int, 1024, "an integer >= 1 (generated tokens held; slide)", lambda v: v >= 1),
        "decoding_recent_size": (int, 256, "an integer >= 0 (newest tokens never evicted; the adaptive start)",
                                 lambda v: v >= 0),
        "delta": (int, 15, "an integer >= 1 (adaptive: one more token every delta steps; discontinuous: "
                           "re-select every delta + 1 steps)", lambda v: v >= 1),
        "window_size": (int, 8, "an integer >= 1 (prefill: SnapKV's observation window)", lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1 (prefill: SnapKV's pooling width)",
                        lambda v: v >= 1 and v % 2 == 1),
        "pooling": (str, "max", "'max' or 'avg' (prefill: SnapKV's pooling)", lambda v: v in ("max", "avg")),
    }
    group_mean_before_pooling = False  # the prefill is snapkv's
    scores = SnapKV.scores              # prefill: SnapKV's pooled window attention, the window kept

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        # the adaptive and discontinuous budgets move with the query's position
        self.budgets_from_state = self.decoding_metric != "slide"

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for scope")
        if self.decoding_recent_size >= self.decoding_window_size:
            raise ValueError(f"decoding_recent_size={self.decoding_recent_size} must be below "
                             f"decoding_window_size={self.decoding_window_size} for scope")

    def decode_budget(self, prompt_len: int) -> int:
        """The prompt's share (what prefill keeps) plus the generated tokens' share: the slide
        window, or the adaptive start (decode_budgets adds the growth)."""
        decode = self.decoding_window_size if self.decoding_metric == "slide" else self.decoding_recent_size
        return self.tokens_to_keep(prompt_len) + decode

    def decode_budgets(self, state, step):
        budgets = super().decode_budgets(state, step)
        if self.decoding_metric == "slide":
            return budgets
        t = (step.positions - step.prompt_lens).clamp(min=0)   # decode steps so far (official counter)
        grown = budgets + (t // self.delta)[:, None]
        if self.decoding_metric == "adaptive":
            return grown
        return grown + (t % (self.delta + 1))[:, None]         # cut back only when t is a multiple of delta + 1

    def recent_window(self, budget):
        return torch.full_like(budget, self.decoding_recent_size)

    def decode_scores(self, probs, state, step):
        attention = probs.mean(dim=2)                                         # [b, H, S], this query's
        prompt = step.key_positions < step.prompt_lens[:, None, None]
        return attention.masked_fill(prompt, float("inf")), state
