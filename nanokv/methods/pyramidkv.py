"""pyramidkv: SnapKV scores with per-layer budgets that fall with depth.

Paper: PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling
(Cai et al., 2024), arXiv 2406.02069. Attention funnels: lower layers spread attention widely,
upper layers focus, so lower layers get more of the budget. With an average budget B and a
window W per layer, as the official PyramidKVCluster (Zefan-Cai/KVCache-Factory @ c97f9d7)
computes it in integers: min = floor((B - W) / beta), max = 2 (B - W) - min; if max >= n - W,
max = n - W and min = 2 (B - W) - max; layer l of L keeps W + max - l floor((max - min) / (L - 1))
(so the total can exceed L x B by a little, as there). Prompts shorter than 2 (B - W) keep B in
every layer (plain SnapKV). Defaults from its run_longbench.py: window_size=8, max pooling,
kernel_size=7, beta=20 (the class default).

`schedule=kvpress` is kvpress's PyramidKVPress, which counts the window inside each layer's
share: min = B / beta, max = 2 B - min, clipped to the prompt less the window, layer l keeps
round(max - l (max - min) / (L - 1)).

What differs:
- GQA: the official default selects per query head; here per kv-head, the group's window
  attention averaged before pooling (KVCache-Factory's kv_head mode, gqa_score_agg=mean).
- schedule=kvpress: kvpress spreads the unrounded n (1 - r); here B = ceil((1 - r) n) (base.py),
  so a layer's share can differ by one token when (1 - r) n is fractional. KVCache-Factory's
  --max_capacity_prompts_ratio rounds n x ratio; here ceil.
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
    group_mean_before_pooling = True  # KVCache-Factory's kv_head mode

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        average = self.tokens_to_keep(n)
        window = min(self.window_size, n)
        if self.schedule == "kvpress":
            return self.kvpress_layer_budget(n, average, window, layer, num_layers)
        prefix = average - window  # B - W, the average prefix share
        if num_layers == 1 or prefix <= 0 or average >= n or n < 2 * prefix:
            return average
        low = int(prefix // self.beta)
        high = 2 * prefix - low
        if high >= n - window:  # the lowest layer would need more than the prompt has: clamp
            high = n - window
            low = 2 * prefix - high
        return window + high - layer * ((high - low) // (num_layers - 1))

    def kvpress_layer_budget(self, n, average, window, layer, num_layers):
        low = average / self.beta
        high = 2 * average - low
        if high >= n - window:
            high = n - window
            low = 2 * average - high
        if not (n >= high >= low >= window) or num_layers == 1:
            return average
        return round(high - layer * (high - low) / (num_layers - 1))
