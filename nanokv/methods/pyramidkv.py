"""pyramidkv: SnapKV scores with per-layer budgets that fall with depth.

Paper: PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling
(Cai et al., 2024), arXiv 2406.02069. Attention funnels: lower layers spread attention widely,
upper layers focus, so lower layers get more of the budget. With an average budget B and a
window W per layer: min = (B - W) / beta, max = 2 (B - W) - min, and layer l of L keeps
W + max - l (max - min) / (L - 1) tokens (the total stays L x B). When the prompt is too short
for the largest layer's share, every layer falls back to B (plain SnapKV). Defaults from the
official run configuration (Zefan-Cai/PyramidKV, now KVCache-Factory): window_size=8, max
pooling, kernel_size=7, beta=20.

kvpress's PyramidKVPress spreads the same way but counts the window inside each layer's
share: min = B / beta, max = 2 B - min, clipped to the prompt less the window, layer l keeps
round(max - l (max - min) / (L - 1)): `schedule=kvpress`.
"""

from nanokv.methods.snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "SnapKV scores, per-layer budgets falling linearly with depth"
    paper = "https://arxiv.org/abs/2406.02069"
    options = {**SnapKV.options,
               "window_size": (int, 8, "an integer >= 1", lambda v: v >= 1),
               "beta": (float, 20.0, "a number > 1", lambda v: v > 1),
               "schedule": (str, "kvcache_factory", "'kvcache_factory' or 'kvpress'",
                            lambda v: v in ("kvcache_factory", "kvpress"))}

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        average = self.tokens_to_keep(n)
        window = min(self.window_size, n)
        if self.schedule == "kvpress":
            return self.kvpress_layer_budget(n, average, window, layer, num_layers)
        if average <= window or num_layers == 1:
            return average
        low = (average - window) / self.beta
        high = 2 * (average - window) - low
        if window + high > n:  # the lowest layer would need more than the prompt has
            return average
        step = (high - low) / (num_layers - 1)
        return window + int(high - layer * step)

    def kvpress_layer_budget(self, n, average, window, layer, num_layers):
        low = average / self.beta
        high = 2 * average - low
        if high >= n - window:
            high = n - window
            low = 2 * average - high
        if not (n >= high >= low >= window) or num_layers == 1:
            return average
        return round(high - layer * (high - low) / (num_layers - 1))
