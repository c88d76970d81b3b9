"""kv_compress: evict whole blocks of each head's least-attended tokens, a different number per head
and layer, under one budget for the sequence.

Paper: KV-Compress: Paged KV-Cache Compression with Variable Compression Rates per Attention Head
(Rehg, 2024), arXiv 2410.00161; official code IsaacRe/vllm-kvcompress @ 5e2a639 (a vLLM fork:
vllm/kvcompress/metrics.py, scheduler.py; vllm/attention/backends/flash_attn.py). Heads need
different amounts of context, but a paged cache frees memory only in whole blocks; so the
eviction is counted in blocks.

Metric (per kv-head, "query-group compression": no KV is repeated for GQA): a token's metric is its
squared attention ("L2-sum") summed over the last `window_size` prompt queries (causal) and over
the query heads of its group, max-pooled along the positions (kernel_size) per query head before
the group sum. While generating, every decode query adds its squared attention, summed over the
group, to the metric of each token it sees.

Blocks: a head's tokens are sorted by metric, lowest first, and cut into evictable "blocks": the
first holds as many tokens as the head's last, partly filled block (h = (n - 1) % block_size + 1),
each later one block_size; a block's metric is that of its highest token. Evicting c blocks of a
head drops its (c - 1) block_size + h lowest tokens and frees exactly c physical blocks; what
stays is a multiple of block_size. The blocks with the lowest metrics across heads go first; a
block holding a protected token (the newest `protected_window` positions) never goes.

Schedule: at the end of the prefill, once every layer has been scored, the sequence keeps
floor(L x H x B / block_size) blocks (B: the request's budget per head, or the share compression
keeps), the lowest blocks of all layers and heads evicted together (`trims_earlier_layers`, as
kvzip). While generating (`continual`, the paper's --continual-compression runs, default), each
layer holds the blocks it was left with: every step, when its heads together hold more blocks,
its lowest blocks across its heads go (each head typically its one lowest token, since its new
token opened a block; a head can also give up a whole block to another).

Defaults: window_size=8, protected_window=8 (experiments/scripts/run_llama_8b.sh, the LongBench
runs of the paper: --prefill-metric-collection-window-size 8 --protected-window-size 8),
L2-sum metric and max pooling with kernel 7 (arg_utils.py metric_aggregation='L2-sum',
maxpool_metrics=True; flash_attn.py pools with kernel_size=7), block_size=16 (run_longbench.py),
continual=true (the compression-rate runs; false is `compress_once`, SamplingParams' default and
the fixed-cache-size runs: compress after prefill only and let the cache grow).

What differs:
- at decode the allocation is across the heads of one layer, each layer keeping the blocks the
  prefill left it; the official re-sorts all layers together every step (nanokv's decode scores
  one layer at a time and cannot see the later layers' metrics).
- the budget is nanokv's (B tokens a head on average, floor(L x H x B / block_size) blocks); the
  official max_cache_tokens rounds B up to a block, and its compression rate applies to the
  tokens outside the protected window.
- a prompt within budget is left whole at prefill and cut to its layer's blocks at the first
  decode step; the official evicts over budget in blocks at any length.
- `block_size` is an option (nanokv does not tell methods the cache's block size): set it to the
  cache's (LLM(block_size=...), default 16) for the kept counts to fill whole blocks.
- not built: the per-head metric bias (kv_head_bias_path; off in the paper's runs), sinks
  (num_attention_sinks, default 0), the metric_collection_buffer (default 0), L1 / average
  aggregations (`metric` offers l1), and the cap on KVs sorted per iteration.
"""

import torch
import torch.nn.functional as F

from nanokv.methods.base import DecodeEvictor, DecodeStep, PrefillView, head_value, observation_attention

inf = float("inf")


def chunk_metrics(metric: torch.Tensor, held: torch.Tensor, block_size: int) -> torch.Tensor:
    """metric [..., S] (inf where a token may not go; the slots past `held` [...] too), -> [..., K]
    the metric of each evictable block of the head, lowest first: block k holds its lowest
    h + k block_size tokens, h = (held - 1) % block_size + 1, and costs its highest one's metric
    (inf where it would reach past the held tokens or hold a protected one)."""
    S = metric.shape[-1]
    ordered = metric.sort(dim=-1).values
    hanging = (held - 1).clamp(min=0) % block_size + 1
    K = (S + block_size - 1) // block_size
    ends = hanging[..., None] - 1 + block_size * torch.arange(K, device=metric.device)
    return ordered.gather(-1, ends.clamp(max=S - 1)).masked_fill(ends >= held[..., None], inf)


def blocks_to_evict(chunks: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """chunks [b, G, K] (G heads' block metrics, rising along K), excess [b] -> [b, G] how many of
    its lowest blocks each head gives up: the `excess` lowest finite ones of the G heads together
    (ties: the earlier head, then the earlier block)."""
    b, G, K = chunks.shape
    flat = chunks.reshape(b, G * K)
    order = flat.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(G * K, device=flat.device).expand(b, -1))
    chosen = (rank < excess[:, None]) & torch.isfinite(flat)
    return chosen.view(b, G, K).sum(-1)


def tokens_evicted(blocks: torch.Tensor, held: torch.Tensor, block_size: int) -> torch.Tensor:
    """c evicted blocks of a head holding `held` -> the tokens they hold: (c - 1) block_size + h."""
    hanging = (held - 1).clamp(min=0) % block_size + 1
    return torch.where(blocks > 0, (blocks - 1) * block_size + hanging, torch.zeros_like(blocks))


class KVCompress(DecodeEvictor):
    name = "kv_compress"
    description = "squared attention of the last queries; evicts whole blocks per head under one budget for all layers"
    paper = "https://arxiv.org/abs/2410.00161"
    # its decode evicts blocks by one ranking over every head's block metrics, tables whose width differs
    # from rank to rank (heads hold different lengths): an exchange not built (nanokv/distributed.py)
    tensor_parallel_reason = ("its decode evicts blocks by a layer-wide ranking over every kv-head's block metrics, "
                              "whose exchange across ranks is not built")
    options = {
        "window_size": (int, 8, "an integer >= 1", lambda v: v >= 1),
        "protected_window": (int, 8, "an integer >= 0", lambda v: v >= 0),
        "kernel_size": (int, 7, "an odd integer >= 1 (1: no pooling)", lambda v: v >= 1 and v % 2 == 1),
        "block_size": (int, 16, "an integer >= 1 (the cache's block size)", lambda v: v >= 1),
        "metric": (str, "l2", "'l2' or 'l1' (squared or plain attention, summed)", lambda v: v in ("l2", "l1")),
        "continual": (bool, True, "true or false", lambda v: True),
    }
    trims_earlier_layers = True  # one allocation over every layer's scores, at the last layer
    budgets_from_state = True    # each layer's blocks are a slot field, and the heads share them
    # the token's metric; the layer's blocks (the same in every slot of the layer)
    slot_fields = {"kvc_metric": torch.float32, "kvc_blocks": torch.int32}

    def check_budget(self):
        least = self.protected_window + self.block_size
        if self.budget is not None and self.budget < least:
            raise ValueError(f"budget={self.budget} must be at least protected_window + block_size = {least} "
                             f"for kv_compress (each head keeps its protected tokens in whole blocks)")

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n  # every layer is held whole until the last one is scored

    def layer_blocks(self, n: int, heads: int) -> int:
        """Blocks a layer of `heads` heads holds for a prompt of n tokens before any allocation."""
        return heads * self.decode_budget(n) // self.block_size

    # --- prefill ---------------------------------------------------------------------------

    def metric_of(self, view: PrefillView) -> torch.Tensor:
        """[H, S]: squared (l1: plain) attention of the last window_size queries, summed over them,
        max-pooled per query head, summed over the group."""
        H, S, _ = view.keys.shape
        attention = observation_attention(view, min(self.window_size, S))  # [Hq, W, S]
        if self.metric == "l2":
            attention = attention * attention
        summed = attention.sum(dim=1)                                         # [Hq, S]
        if self.kernel_size > 1:
            summed = F.max_pool1d(summed[:, None], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
        return summed.view(H, -1, S).sum(dim=1)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        H, S = view.keys.shape[:2]
        blocks = torch.full((H, S), self.layer_blocks(S, H), dtype=torch.int32, device=view.keys.device)
        return {"kvc_metric": self.metric_of(view), "kvc_blocks": blocks}

    def protected(self, S: int, device) -> torch.Tensor:
        """[S] bool: the newest protected_window prompt tokens."""
        return torch.arange(S, device=device) >= S - self.protected_window

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        if self.tokens_to_keep(S) >= S:
            return None  # within budget: left whole (the decode trims it to its blocks)
        state = view.sequence_state.setdefault("kv_compress", {"metric": {}})
        state["metric"][view.layer] = self.state_of(view)["kvc_metric"]
        if view.layer < view.num_layers - 1:
            return None  # held whole until every layer is scored
        layers = sorted(state["metric"])
        metric = torch.stack([state["metric"][layer] for layer in layers])        # [L, H, S]
        L, device = len(layers), metric.device
        guarded = metric.masked_fill(self.protected(S, device), inf)
        held = torch.full((L, H), S, device=device)
        chunks = chunk_metrics(guarded, held, self.block_size)                    # [L, H, K]
        blocks_per_head = (S + self.block_size - 1) // self.block_size
        excess = L * H * blocks_per_head - L * H * self.decode_budget(S) // self.block_size
        evicted = blocks_to_evict(chunks.view(1, L * H, -1), torch.tensor([max(0, excess)], device=device))
        drop = tokens_evicted(evicted.view(L, H), held, self.block_size)          # [L, H]
        # each head drops its `drop` lowest metrics (the older first among equals: a stable sort)
        rank = torch.empty_like(metric, dtype=torch.long).scatter_(
            -1, guarded.argsort(dim=-1, stable=True), torch.arange(S, device=device).expand(L, H, S))
        masks = rank >= drop[..., None]
        kept = S - drop
        state["blocks"] = {layer: int(((kept[i] + self.block_size - 1) // self.block_size).sum())
                           for i, layer in enumerate(layers)}
        state["fewest"] = {layer: int(kept[i].min()) for i, layer in enumerate(layers)}
        state["masks"] = {layer: masks[i] for i, layer in enumerate(layers)}
        return state["masks"].pop(view.layer)

    def earlier_keep_masks(self, view: PrefillView) -> dict[int, torch.Tensor]:
        return view.sequence_state.get("kv_compress", {}).pop("masks", {})

    def earlier_prefill_state(self, view: PrefillView) -> dict[int, dict[str, torch.Tensor]]:
        """Each layer's share of blocks, written into the first slots every head still holds (the
        oldest, which head_value reads; the first decode step copies it to every slot)."""
        state = view.sequence_state.get("kv_compress", {})
        H = view.keys.shape[0]
        return {layer: {"kvc_blocks": torch.full((H, state["fewest"][layer]), blocks, dtype=torch.int32,
                                                 device=view.keys.device)}
                for layer, blocks in state.pop("blocks", {}).items()}

    # --- decode ----------------------------------------------------------------------------

    def recent_window(self, budget: torch.Tensor) -> torch.Tensor:
        return torch.full_like(budget, self.protected_window)

    def decode_scores(self, probs, state, step: DecodeStep):
        attention = probs * probs if self.metric == "l2" else probs
        metric = state["kvc_metric"] + attention.sum(dim=2)                 # the group's sum
        blocks = head_value(state["kvc_blocks"], step)
        return metric, {"kvc_metric": metric, "kvc_blocks": blocks[..., None].expand_as(metric).to(torch.int32)}

    def decode_budgets(self, state: dict[str, torch.Tensor], step: DecodeStep) -> torch.Tensor:
        held = step.visible.sum(-1)                                          # [b, H]
        if not self.continual:
            return held
        newest = (step.positions - self.recent_window(step.budgets))[:, None, None]
        guarded = state["kvc_metric"].masked_fill(~step.visible | (step.key_positions > newest), inf)
        chunks = chunk_metrics(guarded, held, self.block_size)               # [b, H, K]
        bs = self.block_size
        excess = ((held + bs - 1) // bs).sum(-1) - head_value(state["kvc_blocks"], step)[:, 0].long()
        evicted = blocks_to_evict(chunks, excess.clamp(min=0))
        return held - tokens_evicted(evicted, held, bs)
