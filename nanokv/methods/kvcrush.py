"""kvcrush: heavy hitters plus one representative per group of tokens the layer's heads treat alike.

Paper: KVCrush: Key value cache size-reduction using similarity in head-behaviour (Jha, Gobriel,
Talamanova, Jain; Intel Labs, ACML 2025), arXiv 2503.00022. No repository of the paper's own is
public (none named kvcrush in the GitHub index; the paper's abstract points to none); its first
author put it into OpenVINO GenAI (openvinotoolkit/openvino.genai PR #2523, kvcrush.cpp @ 2c25219,
src/cpp/src/continuous_batching/), over paged blocks, which is the code read here. The idea:
most of the budget goes to the important tokens (H2O: accumulated attention, plus a recent
window); what the importance rule would drop is not dropped blindly but grouped, and one token of
each group stays as its stand-in, so the cache keeps some of every kind of context. Per layer:
- each token gets a binary head-behaviour vector, one bit per kv-head: 1 where the token is in
  the top `top_share` of that head's accumulated attention (OpenVINO marks the top half);
- the tokens the importance part does not keep (the pool) are sorted by the Hamming distance of
  their vector to an anchor vector (random, zeros, ones, alternate, or mean: each bit the
  majority over the pool; OpenVINO's KVCrushAnchorPointMode), then by position;
- that order is cut into floor(`crush_ratio` x budget) equal buckets and the first token of each
  stays (OpenVINO: every floor(pool / kept)-th of the sorted order, from its start).
A head-behaviour vector spans the layer's heads, so a token is kept or dropped in every head of
the layer together (OpenVINO too evicts whole blocks per layer): importance is the accumulated
attention averaged over the kv-heads, and the heads' slots stay in the same order. The prompt's
column sums choose at the end of prefill, the accumulated attention of the held tokens at each
decode step (the paper reports LongBench, where compressing the prompt is what counts; OpenVINO
evicts only while generating).
Defaults: crush_ratio 0.25 (a 75/25 split; the paper and OpenVINO's tests vary the share, e.g.
960 + 2 blocks of 32 or 768 + 8: 6-25%), recent_ratio 0.5 of the importance part (H2O's official
split), top_share 0.5 and the random anchor (OpenVINO create_indicators_kvcrush, KVCrushConfig's
default mode), interval 0 (one token a step, as nanokv's other decode evictors).

What differs:
- Only the paper's abstract could be read here: its bit threshold, anchor, split and where it
  runs follow OpenVINO's code and the method's description, not its tables.
- Heavy hitters are chosen per layer (attention averaged over the kv-heads), so every head keeps
  the same tokens; H2O, the importance method the paper builds on, chooses per head.
- Bits per kv-head (the query heads of a group averaged, GQA), from accumulated attention; the
  paper's vector has a bit per attention head. OpenVINO has instead one bit per token of a block
  (its block's vector), from the layer's scores; nanokv follows the paper's per-token vector.
- The random anchor is drawn from a hash of (seed, layer, head), the same every step and after a
  preemption; OpenVINO draws it from a generator each eviction.
- One token leaves per decode step (interval 0): the pool then holds one token more than its
  representatives, and the bucket rule drops the last of the sorted order (farthest from the
  anchor, the newest among equals). interval=D lets the cache grow by D between cuts so that
  the buckets spread (OpenVINO evicts a block at a time), as R-KV's divide_length.
- Ties: heavy hitters among equal scores keep the newer token; the sorted pool puts the older
  first.
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, hashed_uniform

ANCHORS = ("random", "zeros", "ones", "alternate", "mean")


def ranks(primary: torch.Tensor, secondary: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., S] the rank of each slot among the valid ones sorted by primary then secondary, both
    ascending (0: the first); the invalid rank after them all."""
    S = primary.shape[-1]
    by_secondary = secondary.argsort(dim=-1, stable=True)
    key = primary.float().masked_fill(~valid, float("inf")).gather(-1, by_secondary)
    order = by_secondary.gather(-1, key.argsort(dim=-1, stable=True))
    arange = torch.arange(S, device=primary.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange)


class KVCrush(DecodeEvictor):
    name = "kvcrush"
    description = "H2O heavy hitters + one representative per bucket of tokens with alike head-behaviour bits"
    paper = "https://arxiv.org/abs/2503.00022"
    options = {
        "crush_ratio": (float, 0.25, "a number in [0, 1) (share of the budget kept as representatives)",
                        lambda v: 0 <= v < 1),
        "recent_ratio": (float, 0.5, "a number in [0, 1) (share of the importance part kept for the newest "
                                     "tokens)", lambda v: 0 <= v < 1),
        "top_share": (float, 0.5, "a number in (0, 1] (a head's bit is 1 for its top share of tokens)",
                      lambda v: 0 < v <= 1),
        "anchor": (str, "random", f"one of {', '.join(ANCHORS)}", lambda v: v in ANCHORS),
        "seed": (int, 0, "an integer >= 0 (the random anchor's)", lambda v: v >= 0),
        "interval": (int, 0, "an integer >= 0 (0: evict every step; D: grow to budget + D, cut back every D "
                             "tokens)", lambda v: v >= 0),
    }
    needs_column_sums = True
    slot_fields = {"kvcrush_score": torch.float32}

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        self.budgets_from_state = self.interval > 0  # the budget grows between cuts
        self._anchors = {}  # (layer, heads, device) -> the fixed anchors (not "mean", made from the pool)

    def split(self, budget: torch.Tensor):
        """(representatives, recent) of budgets [b]: the importance part is the rest."""
        crush = (budget * self.crush_ratio).long()
        return crush, ((budget - crush) * self.recent_ratio).long()

    def recent_window(self, budget):
        return self.split(budget)[1]

    def decode_budgets(self, state, step):
        budgets = super().decode_budgets(state, step)
        return budgets + (step.positions % self.interval)[:, None] if self.interval else budgets

    def anchor_bits(self, bits: torch.Tensor, pool: torch.Tensor, layer: int) -> torch.Tensor:
        """bits [b, H, S], pool [b, S] -> the anchor [b, H]."""
        b, H, _ = bits.shape
        heads = torch.arange(H, device=bits.device)
        if self.anchor == "mean":  # each bit the majority over the pool
            share = (bits & pool[:, None]).sum(-1) / pool.sum(-1, keepdim=True).clamp(min=1)
            return share > 0.5
        key = (layer, H, bits.device)
        if key not in self._anchors:  # fixed per layer: made once, not each decode step
            self._anchors[key] = {"random": hashed_uniform(self.seed, layer, heads, 0) < 0.5, "zeros": heads < 0,
                                  "ones": heads >= 0, "alternate": heads % 2 == 1}[self.anchor]
        return self._anchors[key].expand(b, H)

    def keep(self, score, positions, held, newest, keep_count, budget, layer):
        """score [b, H, S] accumulated attention; positions, held [b, S] (every head alike);
        newest, keep_count, budget [b] (the cut keeps keep_count; budget sets the split).
        -> [b, S] what the layer keeps: everything where it holds no more than keep_count."""
        crush, recent_n = self.split(budget)
        recent = held & (positions > (newest - recent_n)[:, None])
        older = held & ~recent
        importance = score.mean(dim=1)
        heavy_n = (keep_count - crush)[:, None] - recent.sum(dim=-1, keepdim=True)
        heavy = older & (ranks(-importance, -positions, older) < heavy_n)
        pool = older & ~heavy
        # head-behaviour bits: a head's top share of the held tokens by its own accumulated attention
        n = held.sum(dim=-1)
        top = (n * self.top_share).long()[:, None, None]
        per_head = (-positions[:, None].expand_as(score), held[:, None].expand_as(score))
        bits = held[:, None] & (ranks(-score, *per_head) < top)
        distance = (bits != self.anchor_bits(bits, pool, layer)[..., None]).sum(dim=1)    # [b, S]
        order = ranks(distance, positions, pool)                                         # 0: nearest, oldest
        size = pool.sum(dim=-1, keepdim=True)
        step = (size // crush.clamp(min=1)[:, None]).clamp(min=1)
        representative = pool & (order % step == 0) & (order // step < crush[:, None])
        return torch.where((n > keep_count)[:, None], recent | heavy | representative, held)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.column_sums.shape
        budget = self.layer_budget(S, view.layer, view.num_layers)
        if S <= budget:
            return None
        budget = torch.tensor([budget], device=view.keys.device)
        held = torch.ones(1, S, dtype=torch.bool, device=view.keys.device)
        # one choice for the layer, from every rank's heads (RankHeads): their mean, bits and anchor
        kept = self.keep(view.all_heads(view.column_sums)[None], view.positions[None], held, view.positions[-1:],
                         budget, budget, view.layer)
        return kept.repeat(H, 1)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        return {"kvcrush_score": view.column_sums}

    def decode_scores(self, probs, state, step):
        score = state["kvcrush_score"] + probs.mean(dim=2)
        # every head of the layer holds the same tokens in the same slots: read the first's
        kept = self.keep(step.all_heads(score), step.key_positions[:, 0], step.visible[:, 0], step.positions,
                         self.decode_budgets(state, step)[:, 0], step.budgets, step.layer)
        return kept.float()[:, None].expand_as(score), {"kvcrush_score": score}
