"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, seeded.

The sampler works on a batch of logits [B, vocab] with one set of parameters per row, so
the batching engine can sample every running request in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0      # 0 means greedy
    top_k: int = 0                # 0 means no top-k cut
    top_p: float = 1.0            # 1 means no nucleus cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # generation ends before any of these strings
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, vocab] float32 -> next token ids [B]. Row i uses params[i] and draws its
    randomness from generators[i] (None = torch's global generator)."""
    next_ids = logits.argmax(dim=-1)
    for i, p in enumerate(params):  # only sampled rows pay for the per-row work
        if p.greedy:
            continue
        # shift by the max first: a tiny temperature would otherwise overflow to inf
        probs = _filtered_probs((logits[i] - logits[i].max()) / p.temperature, p.top_k, p.top_p)
        next_ids[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return next_ids


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[before >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs
