"""reattention: pick the cached spans the query points at with RoPE taken off, then attend over them.

Paper: ReAttention: Training-Free Infinite Context with Finite Attention Scope (Liu, Li et al., ICLR
2025; first "Farewell to Length Extrapolation, a Training-Free Infinite Context with Finite Attention
Scope"), arXiv 2407.15176. Before the ordinary attention, a position-agnostic top-k: every query head scores
the older cached keys by q . k with neither rotated (no position at all, so no length it was not
trained on), keeps its `top_k` best tokens, and the heads' picks are pooled into one set. Each
picked token brings the `span_size` tokens around it (a span centred on it); the `budget` holds as
many spans as fit after the `sinks` first and `local` newest tokens, and when more tokens are
picked than spans fit, those picked by the most heads win. Attention then runs over sinks + spans
+ local. Until a sequence holds more than sinks + local tokens it attends over everything. A span
is centred on its token, as in the official code, not a cache page, so the picks are single slots
(cache.attend_slots gathers them). GQA: each query head scores its kv-head's keys, and the pooled
set is the layer's, read by every kv-head: the official decode pools every head's picks
(torch.unique over all of them).

Defaults: the paper's main Llama-3-8B setting in the official code (OpenMOSS/ReAttention @ a62514f,
eval/eval_reattn_long.py, '-reattn-32.4x32.4096.512-gu-clip127'; the rule in
re_attention/cache_utils_v0921.py, DynamicCache.update): global_size 32 (`sinks`), local_size
4096 (`local`), mid_size 4 (`top_k` per query head), span_size 32 (`span_size`), recall_type 'qk'
(scores without RoPE), recall_clip 127 spans, hence the default budget 32 + 127 * 32 + 4096 = 8192
(the budget sets the clip: (budget - sinks - local) // span_size spans).

What differs:
- A budget below the official 8,192 shrinks `sinks` and `local` in proportion (budget 256: 1 and
  128, room for 3 spans) unless they are given; the official code sets the sizes, not a budget.
- Positions: the paper re-assigns positions inside the finite scope (the read tokens get
  consecutive positions, pe_original=False) so that a model attends beyond its trained length. The
  engine stores keys after RoPE and attends with each token's own position; re-assigning would need
  the keys re-rotated per step, which the cache's kernels do not do. So this is ReAttention's
  selection, not its extrapolation: within a model's trained length it is a sparse read.
- The keys are cached after RoPE, so the scores undo it (each key rotated back by its position,
  the query by its own: step.inv_freq); the official cache holds the keys before RoPE.
- Ties in the head vote (which picked tokens keep a span when more were picked than fit) go to the
  older token; the official topk over the counts breaks them as the GPU does.
- At layer 0 a key before RoPE depends on its token alone, so a repeated token ties with itself
  exactly; rounding (of RoPE and back, which differs with the batch's shapes) breaks the tie.
  `skip_layers` (0 by default, as the official code, which selects in every layer) reads the
  first layers whole.
- The official code keeps the middle a multiple of 128 tokens (local shrinks by up to 127 for its
  kernel); here local is `local` exactly. Its prefill is also chunked and sparse past 8192 tokens
  (first_prefill, chunk_size 512); here the prefill is dense, as is a recompute after preemption.
"""

import torch

from nanokv.methods.base import PageReader, Picks, ReadStep, scaled_windows, top_slots
from nanokv.models.rope import apply_rope, rope_cos_sin_gathered


def unrotated(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None, method: str) -> torch.Tensor:
    """x [..., D] rotated by RoPE at `positions` [...] -> float32 x before the rotation (a rotation
    by -position undoes one by +position)."""
    if inv_freq is None:
        raise ValueError(f"method {method!r} scores without RoPE and needs the model's RoPE speeds (ReadStep.inv_freq)")
    cos, sin = rope_cos_sin_gathered(-positions.reshape(-1), inv_freq.to(x.device), torch.float32)
    return apply_rope(x.float().reshape(-1, 1, x.shape[-1]), cos, sin).view(x.shape)


def spans_around(centres: torch.Tensor, size: int, low: torch.Tensor, high: torch.Tensor, S: int) -> torch.Tensor:
    """centres [b, c] (-1: none) -> [b, S] bool: slots within a span of `size` centred on a centre
    (from centre - size // 2, size of them), cut to [low, high) [b]."""
    valid = centres >= 0
    start = torch.maximum(centres - size // 2, low[:, None])
    end = torch.minimum(centres + (size + 1) // 2, high[:, None])
    # +1 where a span opens, -1 where it closes: a running sum above 0 is inside one
    edges = torch.zeros(centres.shape[0], S + 1, dtype=torch.int64, device=centres.device)
    edges.scatter_add_(1, torch.where(valid, start, S), valid.long())
    edges.scatter_add_(1, torch.where(valid, end, S), -valid.long())
    return edges.cumsum(-1)[:, :S] > 0


class ReAttention(PageReader):
    name = "reattention"
    description = "query-aware sparse decode: spans around the tokens each head scores highest with RoPE taken off"
    paper = "https://arxiv.org/abs/2407.15176"
    default_budget = 8192
    options = {
        "sinks": (int, 32, "an integer >= 0", lambda v: v >= 0),
        "local": (int, 4096, "an integer >= 0", lambda v: v >= 0),
        "top_k": (int, 4, "an integer >= 1", lambda v: v >= 1),
        "span_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
        "skip_layers": (int, 0, "an integer >= 0", lambda v: v >= 0),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        options = scaled_windows(options, budget, self.default_budget, {"sinks": 32, "local": 4096})
        super().__init__(compression, budget, **options)

    def check_budget(self):
        least = self.sinks + self.local + self.span_size
        if self.budget < least:
            raise ValueError(f"budget={self.budget} must be at least sinks + local + span_size = {least} for "
                             f"reattention (room for one span); lower them with the sinks=, local= and "
                             f"span_size= options")

    def spans(self) -> int:
        return (self.budget - self.sinks - self.local) // self.span_size

    def pick(self, step: ReadStep) -> Picks:
        b, H, S, D = step.keys.shape
        n = step.lengths[:, 0]  # nothing is evicted: every head holds the same tokens in the same slots
        slot = torch.arange(S, device=n.device)
        held = slot < n[:, None]
        older = (slot >= self.sinks) & (slot < (n - self.local)[:, None])  # [b, S] what the spans come from
        keys = unrotated(step.keys, step.key_positions, step.inv_freq, self.name)
        queries = unrotated(step.queries, step.positions[:, None].expand(step.queries.shape[:2]), step.inv_freq,
                            self.name)
        logits = step.logits(keys, queries).masked_fill(~older[:, None, None], float("-inf"))  # [b, H, g, S]
        best = logits.topk(min(self.top_k, S), dim=-1)
        # every query head's picks pooled: a token counts the heads that picked it
        # (every rank's heads: the votes are the layer's, RankHeads), a miss voting for slot S
        voted = step.all_heads(torch.where(best.values > float("-inf"), best.indices, S))
        picked = voted < S
        votes = torch.zeros(b, S + 1, dtype=torch.int64, device=n.device)
        votes.scatter_add_(1, voted.flatten(1), picked.long().flatten(1))
        order = votes[:, :S].sort(dim=-1, descending=True, stable=True)  # ties: the older token
        keep = min(self.spans(), S)
        centres = order.indices[:, :keep].masked_fill(order.values[:, :keep] == 0, -1)
        read = spans_around(centres, self.span_size, torch.full_like(n, self.sinks), n - self.local, S)
        read |= (slot < self.sinks) | (slot >= (n - self.local)[:, None])
        dense = n <= self.sinks + self.local  # the official rule: no recall until the cache outgrows the window
        read = (read | dense[:, None]) & held
        slots = top_slots(torch.zeros(b, S, device=n.device).masked_fill(~read, float("-inf")), self.budget)
        scored = (older.sum(-1) * ~dense).sum() * H * (D * step.itemsize)  # every older key, all kv-heads
        return Picks(slots=slots[:, None].expand(b, H, -1), scored_bytes=scored)
