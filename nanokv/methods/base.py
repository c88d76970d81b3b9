"""The contract between a compression method and the engine.

A method never touches storage. At the end of a sequence's prefill, for each layer right after
that layer's attention has run, the engine shows it a `PrefillView` (the layer's queries, the
keys it just cached, their positions) and asks for a keep mask [kv_heads, tokens]; the cache
then compacts those heads and frees their tail blocks (nanokv/cache/kv_cache.py). Within one
forward pass no other layer reads layer l's KV, so this equals compressing after the pass.

Budgets are per request: `compression=r` keeps ceil((1 - r) * prompt tokens) per (layer, head)
(the fraction removed, as in kvpress); `budget=B` keeps B. Prompts already within budget are
left alone. Decode-time methods (H2O, TOVA) and read-time methods (Quest) will extend this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PrefillView:
    """What a prefill-time method sees for one sequence at one layer."""
    layer: int
    num_layers: int
    queries: torch.Tensor    # [T, Hq, D] the prompt's queries at this layer (after RoPE)
    keys: torch.Tensor       # [H, S, D] the layer's cached keys in slot order (after RoPE)
    positions: torch.Tensor  # [S] position of each cached slot


class Method:
    name = "full"
    description = "no compression: every token is kept"
    paper = ""
    # option name -> (type, default, "valid range" text, check)
    options: dict = {}

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        if budget is not None:
            if not isinstance(budget, int) or budget <= 0:
                raise ValueError(f"budget must be a positive number of tokens, got {budget!r}")
            if compression:
                raise ValueError("give either compression or budget, not both")
        if not (isinstance(compression, (int, float)) and 0 <= compression < 1):
            raise ValueError(f"compression must be in [0, 1) (the fraction of tokens removed), got {compression!r}")
        self.compression, self.budget = float(compression), budget
        if type(self).scores is Method.scores and (compression or budget is not None):
            raise ValueError(f"method {self.name!r} does not compress; choose a method to use "
                             f"compression or budget (see --list-methods)")
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise ValueError(f"unknown option {sorted(unknown)[0]!r} for method {self.name!r}; valid: {valid}")
        for key, (kind, default, valid_range, check) in self.options.items():
            value = options.get(key, default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, str) and kind is not str:
                try:
                    value = kind(value)
                except ValueError:
                    raise ValueError(f"option {key}={value!r} of method {self.name!r} must be "
                                     f"{kind.__name__}, {valid_range}") from None
            if not isinstance(value, kind) or not check(value):
                raise ValueError(f"option {key}={value!r} of method {self.name!r} must be {valid_range}")
            setattr(self, key, value)
        self.check_budget()

    @property
    def compresses(self) -> bool:
        return self.compression > 0 or self.budget is not None

    def check_budget(self):
        """Methods with a minimum (a window, sinks) refuse budgets below it."""

    def tokens_to_keep(self, n: int) -> int:
        keep = self.budget if self.budget is not None else math.ceil((1 - self.compression) * n)
        return min(n, keep)

    def applies_to(self, layer: int) -> bool:
        return True

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        """Tokens layer `layer` keeps per head; uneven allocations (PyramidKV) override this,
        keeping the request's total."""
        return self.tokens_to_keep(n)

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S] importance of each cached token per kv-head: the highest are kept."""
        raise NotImplementedError

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        """[H, S] bool, or None to keep everything."""
        S = view.keys.shape[1]
        k = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if k >= S or not self.applies_to(view.layer):
            return None
        top = self.scores(view).topk(k, dim=-1).indices
        return torch.zeros(view.keys.shape[:2], dtype=torch.bool, device=top.device).scatter_(1, top, True)
