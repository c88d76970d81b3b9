"""retrieval_head: detected retrieval heads keep the whole prompt, the other heads the budget.

Paper: Retrieval Head Mechanistically Explains Long-Context Factuality (Wu, Wang, Xiao, Peng, Fu,
2024; ICLR 2025), arXiv 2404.15574; official code nightdessert/Retrieval_Head @ 1012272
(retrieval_head_detection.py). A few heads copy what a needle-in-a-haystack question asks for out
of the context; the paper detects them with a copy-paste probe: at each decode step, a head
copies when its argmax attention lands inside the needle's answer span on the very token the
model generates; its retrieval score is the copies / the span's length, averaged over the probes.
Heads scoring above 0.1 are retrieval heads (under 5% of heads in the models it studies).
`python -m nanokv.calibrate retrieval_head` writes the scores (nanokv/calibrate/).

The paper proposes no cache policy; it names KV-cache compression as a consequence (the
retrieval heads need the whole context, most heads do not). nanokv takes the split that
DuoAttention (arXiv 2410.10819, streaming heads) and RazorAttention (arXiv 2407.15891,
non-retrieval heads) deploy: a (layer, kv-head) whose score exceeds `threshold` keeps the whole
prompt; every other head keeps the request's budget B (`compression=r`: ceil((1 - r) n); or
`budget=B`). others=streaming (the default, as both of those methods): the `sink_size` first
tokens and the newest B - sink_size. others=snapkv: SnapKV's choice within B (its window, then
the prefix tokens the window attends to most; options window_size, kernel_size, pooling), the
in-head selection HeadKV pairs these scores with. It acts once, after prefill: generated tokens
are kept in every head. Heads of a layer really end with different lengths.

GQA: the artifact scores each kv-head by the max over its query heads: the kv-head's cache serves
every query head of its group, so one retrieval query head makes it a retrieval head.

Defaults: threshold=0.1 (the paper's, Section 2); sink_size=4 (StreamingLLM's four initial
tokens, arXiv 2309.17453); others=streaming; SnapKV's window_size=32, max pooling, kernel_size=7
(nanokv/methods/snapkv.py) for others=snapkv.
What differs:
- the scores come from nanokv's teacher-forced probe with synthetic needles, every sample kept;
  the official detector decodes greedily over Paul Graham essays (3 needles, lengths to 50K, 10
  depths) and keeps the samples answered with ROUGE-1 recall > 0.5 (nanokv/calibrate/).
- per kv-head (max over its query heads), not per query head: nanokv's cache holds kv-heads.
- the budget policy is nanokv's reading of the paper's implication (see above), not the paper's.
- acts once after prefill (as DuoAttention's kvpress press); generated tokens are never evicted.
"""

import math

import torch

from nanokv.methods.base import CALIBRATION_FILE, PrefillView, top_per_head
from nanokv.methods.snapkv import SnapKV


class RetrievalHead(SnapKV):
    name = "retrieval_head"
    description = ("calibrated retrieval heads (copy score > threshold) keep everything, the others the "
                   "budget: sinks + recent (or SnapKV)")
    paper = "https://arxiv.org/abs/2404.15574"
    calibration = "retrieval_head"
    options = {**SnapKV.options,
               "threshold": (float, 0.1, "a number in [0, 1)", lambda v: 0 <= v < 1),
               "others": (str, "streaming", "'streaming' (sinks + recent) or 'snapkv'",
                          lambda v: v in ("streaming", "snapkv")),
               "sink_size": (int, 4, "an integer >= 0", lambda v: v >= 0),
               "calibration_file": CALIBRATION_FILE}
    head_scores: torch.Tensor | None = None  # [L, H] from bind_calibration

    def check_budget(self):
        if self.budget is None:
            return
        if self.others == "streaming" and self.budget <= self.sink_size:
            raise ValueError(f"budget={self.budget} must exceed sink_size={self.sink_size} for {self.name} "
                             f"(a non-retrieval head keeps its sinks and at least one recent token)")
        if self.others == "snapkv" and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for {self.name} "
                             f"with others=snapkv")

    def bind_calibration(self, artifact: dict):
        self.head_scores = torch.tensor(artifact["head_scores"], dtype=torch.float64, device="cpu")  # a profile: read once

    def _scores_bound(self) -> torch.Tensor:
        if self.head_scores is None:
            raise ValueError(f"method {self.name!r} has no calibration: bind_calibration first "
                             f"(LLM does; make one with python -m nanokv.calibrate {self.calibration})")
        return self.head_scores

    def retrieval_heads(self) -> torch.Tensor:
        """[L, H] bool: the heads that keep the whole prompt."""
        return self._scores_bound() > self.threshold

    def others_keep(self, n: int) -> int:
        """Tokens a non-retrieval head keeps of an n-token prompt: the request's budget."""
        return self.tokens_to_keep(n)

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """Exact, on average over the layer's heads (rounded up)."""
        if not self.compresses:
            return n
        protected = self.retrieval_heads()[layer]
        full = int(protected.sum())
        return math.ceil((full * n + (len(protected) - full) * min(n, self.others_keep(n))) / len(protected))

    def streaming_scores(self, H: int, S: int, device) -> torch.Tensor:
        """[H, S]: the sinks first (earliest highest), then the newest tokens; no ties."""
        order = torch.arange(S, dtype=torch.float32, device=device)
        sinks = min(self.sink_size, S)
        order[:sinks] = 2 * S - torch.arange(sinks, dtype=torch.float32, device=device)
        return order.expand(H, S)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        device = view.keys.device
        if not self.compresses:
            return None
        keep = self.others_keep(S)
        others = ~self.retrieval_heads()[view.layer].to(device)
        if keep >= S or not bool(others.any()):
            return None
        scores = self.scores(view) if self.others == "snapkv" else self.streaming_scores(H, S, device)
        mask = torch.ones(H, S, dtype=torch.bool, device=device)
        mask[others] = top_per_head(scores[others], keep)
        return mask
