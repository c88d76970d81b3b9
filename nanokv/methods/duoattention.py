"""duoattention: retrieval heads keep the whole prompt, streaming heads its sinks and recent tokens.

Paper: DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads
(Xiao et al., ICLR 2025), arXiv 2410.10819. Only some heads need the whole context (retrieval
heads); the others look at the first tokens and the recent ones (streaming heads), so those keep
`sink_size` first + `recent_size` newest prompt tokens. Which heads stream comes from a per-head
score made ahead of time by `python -m nanokv.calibrate duoattention` (nanokv/calibrate/): the
paper trains a gate per head on synthetic passkey retrieval, not feasible here, so the command
computes NVIDIA kvpress's training-free on-the-fly approximation (DuoAttentionPress with
on_the_fly_scoring, `duo_attention_on_the_fly`): per layer, the mean pre-RoPE query and key over
calibration text, repeated at positions 0..499 with RoPE, the last query's attention over those
keys, score = the area under its cumulative attention curve, averaged over each kv-head's query
heads and over samples. The lowest-scoring (layer, kv-head) pairs of the whole model stream.

Knob, as every method: `compression=r` or `budget=B` (B = ceil((1 - r) n) for an n-token prompt),
the tokens a head keeps on average. A fraction f = (n - B) / (n - sink_size - recent_size),
clamped to [0, 1], of the model's heads stream: the round(f L H) lowest-scoring pairs (kvpress's
head_compression_ratio = f, its argsort over the score matrix), so the prompt keeps about B tokens
a head. Prompts of at most sink_size + recent_size tokens are kept whole; where B is below that,
every head streams and keeps sink_size + recent_size. Heads of a layer really end with different
lengths. It acts once, after prefill, as kvpress's press does: generated tokens are kept in every
head.

Defaults: sink_size=128, recent_size=256 (kvpress DuoAttentionPress @ 8bb29b9, on-the-fly
setting, whose head scores and kept sets these equal; the sizes the released patterns were
trained with, mit-han-lab/duo-attention @ fe93c31 attn_patterns/*/config.json).
What differs:
- head scores are kvpress's training-free approximation, not the paper's trained gates
  (attn_patterns/*/full_attention_heads.tsv).
- the official LongBench and needle scripts deploy sink 64, recent 256.
- acts once after prefill (kvpress); the official streaming heads are cut back to sink + recent
  after every step, and its LongBench runs feed the last 50 prompt tokens as decode steps.
- the streaming-head count is round(f L H) by a stable argsort (kvpress), with f from the
  budget; the official `--sparsity` thresholds at np.quantile of the scores plus U(0, 1e-6).
"""

import math

import torch

from nanokv.methods.base import CALIBRATION_FILE, PrefillSelector, PrefillView


class DuoAttention(PrefillSelector):
    name = "duoattention"
    description = "calibrated retrieval heads keep everything, the other heads sinks + recent tokens"
    paper = "https://arxiv.org/abs/2410.10819"
    calibration = "duoattention"
    options = {
        "sink_size": (int, 128, "an integer >= 0", lambda v: v >= 0),
        "recent_size": (int, 256, "an integer >= 1", lambda v: v >= 1),
        "calibration_file": CALIBRATION_FILE,
    }
    head_scores: torch.Tensor | None = None  # [L, H] from bind_calibration

    def check_budget(self):
        window = self.sink_size + self.recent_size
        if self.budget is not None and self.budget < window:
            raise ValueError(f"budget={self.budget} must be at least sink_size + recent_size = {window} for "
                             f"{self.name} (what a streaming head keeps)")

    def bind_calibration(self, artifact: dict):
        self.head_scores = torch.tensor(artifact["head_scores"], dtype=torch.float64, device="cpu")  # a profile: read once

    def streaming_heads(self, n: int) -> torch.Tensor:
        """[L, H] bool: the heads that stream for an n-token prompt."""
        if self.head_scores is None:
            raise ValueError(f"method {self.name!r} has no calibration: bind_calibration first "
                             f"(LLM does; make one with python -m nanokv.calibrate {self.calibration})")
        window = self.sink_size + self.recent_size
        streaming = torch.zeros(self.head_scores.shape, dtype=torch.bool, device="cpu")
        if not self.compresses or n <= window:
            return streaming
        fraction = min(1.0, max(0.0, (n - self.tokens_to_keep(n)) / (n - window)))
        count = round(fraction * streaming.numel())
        lowest = torch.argsort(self.head_scores.flatten(), stable=True)[:count]
        return streaming.flatten().index_fill_(0, lowest, True).view(streaming.shape)

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """Exact, on average over the layer's heads (rounded up)."""
        if not self.compresses:
            return n
        streaming = int(self.streaming_heads(n)[layer].sum())
        H = self.head_scores.shape[1]
        kept = min(n, self.sink_size + self.recent_size)
        return math.ceil(((H - streaming) * n + streaming * kept) / H)

    def scores(self, view: PrefillView) -> torch.Tensor:
        """A streaming head's order: its sinks first, then the newest tokens."""
        H, S = view.keys.shape[:2]
        recency = torch.arange(S, dtype=torch.float32, device=view.keys.device)
        recency[:self.sink_size] = float("inf")
        return recency.expand(H, S)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        S = view.keys.shape[1]
        streaming = self.streaming_heads(S)[view.layer].to(view.keys.device)
        if not streaming.any():
            return None
        keep = torch.ones(view.keys.shape[:2], dtype=torch.bool, device=view.keys.device)
        top = self.scores(view)[streaming].topk(self.sink_size + self.recent_size, dim=-1).indices.to(keep.device)
        keep[streaming] = torch.zeros_like(keep[streaming]).scatter_(1, top, True)
        return keep
