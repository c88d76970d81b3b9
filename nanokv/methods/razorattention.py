"""razorattention: echo and induction heads keep the whole prompt, the others sinks + a recent buffer.

Paper: RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (Tang, Lin, Lin,
Han, Ke, Hong, Yao, Wang; Huawei; ICLR 2025), arXiv 2407.15891. No public code; the authors'
vendor toolkit (Huawei msModelSlim, `RARopeCompressConfig`) ships the head profiling only.
Most heads attend to local context; a few (retrieval heads) reach over the whole input, so those
keep a full cache and the others drop remote tokens. For RoPE models the retrieval heads are found
data-free: feed random tokens repeated a few times; an echo head attends to the previous
occurrence of the current token, an induction head to the token after it. The top 1% of heads by
echo score and the top 14% by induction score are protected (`python -m nanokv.calibrate
razorattention` writes both scores; nanokv/calibrate/razorattention.py). Algorithm 1: every
other head keeps its first N0 sink tokens and the recent L_h = max(S0, N / C) tokens of its N.

Knob, as every method: N / C is the request's share, `compression=r` keeps ceil((1 - r) N) (so
C = 1 / (1 - r)) and `budget=B` keeps B; a non-retrieval head holds sink_size + max(s0, that),
at most N. Protected heads keep the whole prompt. It acts once, after prefill (Algorithm 1 takes
the prefill's cache): generated tokens are kept in every head.

Compensation token (`compensation=true`, the default; false drops the tokens): each non-retrieval head that drops tokens keeps one slot
more, the newest dropped token's (the oldest past the sinks that it keeps, so its position is
before every later query's), and it becomes the paper's compensation token: k = the mean of the
dropped keys (itself included), v = the mean of their values, and a logit bias log d for the d
tokens it stands for (the slot field `razor_log_count`, the cache's `attention_bias`: every
attention over the cache adds it, nanokv/kernels/__init__.py). A query that sees the dropped
tokens alike (equal logits) then reads the same output from the compensation token as from them.

Defaults: echo_ratio=0.01, induction_ratio=0.14 (the paper's protected shares; msModelSlim's
RARopeCompressConfig defaults echo_head_ratio=0.01, induction_head_ratio=0.14: CANN
8.0.RC3.alpha003 docs, modelslim_0099). sink_size (N0) = 4 and s0 (S0) = 0 are nanokv's: the
paper's N0, S0 and C could not be read here (only its Algorithm 1 was); N0 = 4 is StreamingLLM's
sink count, and S0 = 0 leaves the budget alone to set L_h (give s0 to floor it, as the paper does
to spare short inputs).
What differs:
- with the compensation token a head keeps sink_size + L_h + 1 slots (the token takes the slot of
  the newest dropped one), and the method cannot be combined with a quantizer (quantized blocks
  carry no bias: razorattention+kivi needs compensation=false). The keys averaged are the cached
  ones, after RoPE.
- kv-heads: each kv-head scores the max over its query heads (it serves all of them), and the
  shares are of the model's kv-heads, ceil(share x L x H) each (the paper ranks query heads).
- the probe (random ordinary token ids, a segment repeated 4 times, 8 samples of 1024 tokens) is
  nanokv's; the paper's sequence length and repeat count were not checked.
- RoPE models only (nanokv's); the paper's ALiBi variant (per-head reach from the slopes) is not here.
"""

import math

import torch

from nanokv.methods.base import CALIBRATION_FILE, Merger, PrefillView
from nanokv.methods.retrieval_head import RetrievalHead


def share(ratio: float, count: int) -> int:
    """ceil(ratio x count), a product that lands on an integer kept as that integer."""
    return min(count, math.ceil(round(ratio * count, 9)))


class RazorAttention(RetrievalHead, Merger):
    name = "razorattention"
    description = ("top echo + induction heads (random-token profile) keep everything, the others "
                   "sinks + recent + a compensation token")
    paper = "https://arxiv.org/abs/2407.15891"
    calibration = "razorattention"
    others = "streaming"  # Algorithm 1: sinks + the recent buffer, never SnapKV
    options = {"echo_ratio": (float, 0.01, "a number in [0, 1]", lambda v: 0 <= v <= 1),
               "induction_ratio": (float, 0.14, "a number in [0, 1]", lambda v: 0 <= v <= 1),
               "sink_size": (int, 4, "an integer >= 0", lambda v: v >= 0),
               "s0": (int, 0, "an integer >= 0", lambda v: v >= 0),
               "compensation": (bool, True, "true or false (fold each other head's dropped tokens into one "
                                "slot weighing as many)", lambda v: True),
               "calibration_file": CALIBRATION_FILE}
    echo_scores: torch.Tensor | None = None  # [L, H]; head_scores holds the induction scores

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        if self.compensation:  # the compensation token's count, read as a logit bias (base.py)
            self.slot_fields = {"razor_log_count": torch.float32}
            self.attention_bias = "razor_log_count"
            self.needs_values = True

    def check_budget(self):
        """Any budget: a head keeps its sinks on top of its recent buffer (at least one token)."""

    def bind_calibration(self, artifact: dict):
        super().bind_calibration(artifact)
        echo = artifact.get("echo_scores")
        if not (isinstance(echo, list) and torch.tensor(echo, dtype=torch.float64, device="cpu").shape
                == self.head_scores.shape):
            raise ValueError(f"the razorattention calibration holds no echo_scores of shape "
                             f"{tuple(self.head_scores.shape)}; make it again with python -m nanokv.calibrate "
                             f"razorattention")
        self.echo_scores = torch.tensor(echo, dtype=torch.float64, device="cpu")

    def retrieval_heads(self) -> torch.Tensor:
        """[L, H] bool: the top echo_ratio of kv-heads by echo score and the top induction_ratio by
        induction score (ties to the earlier head)."""
        induction = self._scores_bound()
        protected = torch.zeros(induction.numel(), dtype=torch.bool, device=induction.device)
        for scores, ratio in ((self.echo_scores, self.echo_ratio), (induction, self.induction_ratio)):
            top = torch.argsort(-scores.flatten(), stable=True)[:share(ratio, scores.numel())]
            protected[top] = True
        return protected.view(induction.shape)

    def others_keep(self, n: int) -> int:
        """N0 sinks + L_h = max(S0, N / C) recent tokens of an n-token prompt, at most n; with the
        compensation token one more, the newest dropped token's slot (nothing dropped: none)."""
        keep = self.sink_size + max(self.s0, self.tokens_to_keep(n))
        return min(n, keep + 1 if self.compensation and keep < n else keep)

    def merge(self, view: PrefillView, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The compensation token: in each head that drops tokens, the oldest kept slot past the
        sinks takes the mean key and value of the dropped ones and itself, and log of their count."""
        if not self.compensation:
            return {}
        H, S, _ = view.keys.shape
        order = torch.arange(S, device=keep.device)
        # the oldest kept slot past the sinks (the streaming choice keeps sinks, then the newest)
        slot = torch.where(keep & (order >= self.sink_size), order, S).amin(dim=-1, keepdim=True)   # [H, 1]
        folded = (~keep).scatter(-1, slot.clamp(max=S - 1), True) & (~keep).any(-1, keepdim=True)
        count = folded.sum(-1, keepdim=True)                                                   # [H, 1]
        at = folded.any(-1, keepdim=True) & (order == slot)                                    # [H, S]
        merged = {"razor_log_count": torch.where(at, count.clamp(min=1).float().log(), 0.0)}
        for name, x in (("k", view.keys), ("v", view.values)):
            mean = (x.float() * folded[..., None]).sum(1, keepdim=True) / count.clamp(min=1)[..., None]
            merged[name] = torch.where(at[..., None], mean, x.float())
        return merged
