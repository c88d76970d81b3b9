"""r_kv: keep what recent queries attend to and is not a near-copy of other cached keys.

Paper: R-KV: Redundancy-aware KV Cache Compression for Reasoning Models (Cai et al., 2025),
arXiv 2505.24133; official code Zefan-Cai/R-KV @ d15c976 (class R1KV in rkv/compression/r1_kv.py,
rkv/utils.py). Long reasoning outputs repeat themselves, so their cache holds many keys that say
the same thing. Per (layer, kv-head), the window being the last α tokens, the prefix the others:
- logits of the last α queries over the keys, q·k/sqrt(D), max over the query heads of the group
  (GQA: the max of the logits, not of probabilities);
- I, importance: per query a softmax over the prefix keys only (the window's keys left out),
  the mean over the α queries, then max-pooled over the prefix (kernel 7, padding 3, stride 1)
  so a token's neighbours survive with it; nothing of the window is pooled into the prefix;
- R, redundancy: the cosine similarity of each key to every other held key (the window's too),
  each row first dropping its similarity to its most recent near-duplicate (cosine >
  `threshold`), averaged per key, softmaxed over the keys;
- score = λ·I − (1−λ)·R; the top B − α of the prefix and the window make the budget B.
- schedule, `divide_length` D > 0 (the official one with D = 128): the cache grows to B + D, and
  the step whose query sits at a multiple of D attends over all of it, then cuts it back to B
  (the official `self.length % divide_length == 0`; here `decode_budgets` B + position mod D).
  A prompt longer than B is cut to B at prefill, from its last α queries.
Defaults from the official code (d15c976): α = 8 (R1KV), kernel 7 (R1KV), threshold 0.5
(utils.cal_similarity), λ = 0.07 (R1KV and run_math.py; the README's table says 0.1).

Differences from the official code:
- divide_length = 0 by default: a head evicts one token whenever it holds B + 1, so it always
  holds B as the other decode methods here do (scoring every step: R is O(S² D) per head).
- The last α queries' logits are kept per key as α slot fields (`rkv_logit0`..), a ring indexed
  by the query's position mod α (4α bytes per token), where the official code keeps the queries.
- Pooling and ties run in position order (the official cache, once cut, is in score order and
  pools over slot neighbours).
- A key with no near-duplicate drops nothing (the official code then drops its similarity to
  the first key).
- Scores in float32 (the official code rounds I and the similarities to the model dtype).
- The schedule's phase is the query's position; the official counter also runs across requests.
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import DecodeEvictor, PrefillView


def pooled_in_position_order(attention, positions, held, kernel):
    """attention [..., S] (>= 0) max-pooled over each slot's `kernel` nearest held neighbours in
    position order, returned in slot order; 0 where not held."""
    S = attention.shape[-1]
    order = positions.masked_fill(~held, torch.iinfo(positions.dtype).max).argsort(dim=-1, stable=True)
    ranked = attention.masked_fill(~held, 0).gather(-1, order)          # held first, oldest first
    pooled = F.max_pool1d(ranked.reshape(-1, 1, S), kernel, stride=1, padding=kernel // 2).view(ranked.shape)
    return torch.empty_like(pooled).scatter_(-1, order, pooled).masked_fill(~held, 0)


def redundancy(keys, positions, held, threshold):
    """keys [H, S, D], positions [H, S], held [H, S] -> [H, S]: softmax over the held keys of each
    key's mean cosine similarity to the others, each key first dropping its similarity to its
    most recent near-duplicate (cosine > threshold); 0 where not held."""
    S = keys.shape[1]
    unit = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)                                  # [H, S, S] row i, column j
    pair = held[:, :, None] & held[:, None, :] & ~torch.eye(S, dtype=torch.bool, device=keys.device)
    sim = sim.masked_fill(~pair, 0)
    # row i's most recent near-duplicate: the held j != i with sim > threshold and the newest position
    newest = positions[:, None, :].masked_fill(~(pair & (sim > threshold)), -1).max(dim=-1)
    has = newest.values >= 0
    sim.scatter_(-1, newest.indices[..., None], sim.gather(-1, newest.indices[..., None]) * ~has[..., None])
    mean = sim.sum(dim=1) / held.sum(dim=-1, keepdim=True).clamp(min=1)  # over the rows i
    return mean.masked_fill(~held, float("-inf")).softmax(dim=-1).masked_fill(~held, 0)


def group_max_logits(queries, keys):
    """queries [..., Hq, D], keys [..., H, S, D] -> [..., H, S]: q·k/sqrt(D), max over each group."""
    H, S, D = keys.shape[-3:]
    logits = torch.einsum("...hgd,...hsd->...hgs", queries.float().unflatten(-2, (H, -1)), keys.float())
    return logits.max(dim=-2).values / math.sqrt(D)


class RKV(DecodeEvictor):
    name = "r_kv"
    description = "λ·(attention of the last α queries, max-pooled) − (1−λ)·key redundancy; last α kept"
    paper = "https://arxiv.org/abs/2505.24133"
    budgets_from_state = True  # the budget grows between cuts (divide_length)
    options = {
        "window_size": (int, 8, "an integer >= 1 (α: the queries importance is averaged over, and the newest "
                                "tokens, never evicted)", lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1 (the max-pooling width over neighbouring tokens)",
                        lambda v: v >= 1 and v % 2 == 1),
        "mix_lambda": (float, 0.07, "a number in [0, 1] (λ: the weight of importance against redundancy)",
                       lambda v: 0 <= v <= 1),
        "threshold": (float, 0.5, "a number in [-1, 1] (the cosine above which a key is a near-duplicate)",
                      lambda v: -1 <= v <= 1),
        "divide_length": (int, 0, "an integer >= 0 (0: evict every step; D: let the cache grow to budget + D, "
                                  "cut back to budget every D tokens, as the official code with 128)",
                          lambda v: v >= 0),
    }
    decode_reads = frozenset({"keys", "queries"})

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        self.slot_fields = {f"rkv_logit{k}": torch.float32 for k in range(self.window_size)}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for r_kv")

    def recent_window(self, budget):
        return budget.clamp(max=self.window_size)

    def decode_budgets(self, state, step):
        budgets = super().decode_budgets(state, step)
        return budgets + (step.positions % self.divide_length)[:, None] if self.divide_length else budgets

    def score(self, rows, keys, positions, held, newest):
        """rows [α, H, S]: the last α queries' logits; newest: the last query's position.
        -> [H, S] λ·I − (1−λ)·R (only the prefix's count)."""
        prefix = held & (positions <= newest - self.window_size)
        # (a head with no prefix, its budget within the window, has no importance: 0, not nan)
        importance = rows.masked_fill(~prefix, float("-inf")).softmax(dim=-1).mean(dim=0).nan_to_num(0.0)
        pooled = pooled_in_position_order(importance, positions, prefix, self.kernel_size)
        return self.mix_lambda * pooled - (1 - self.mix_lambda) * redundancy(keys, positions, held, self.threshold)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The logits of the prompt's last min(α, T) queries, each in field (its position mod α)."""
        H, S, _ = view.keys.shape
        window = min(self.window_size, len(view.queries))
        q_pos = view.positions[-window:]
        logits = group_max_logits(view.queries[-window:], view.keys)          # [W, H, S]
        # a later key's logit is never read: that key stays in the window as long as this query does
        logits = logits.masked_fill(view.positions > q_pos[:, None, None], 0)
        state = {name: torch.zeros(H, S, device=view.keys.device) for name in self.slot_fields}
        for w, position in enumerate(q_pos.tolist()):
            state[f"rkv_logit{position % self.window_size}"] = logits[w]
        return state

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S, _ = view.keys.shape
        rows = torch.stack(list(self.state_of(view).values()))
        positions = view.positions.expand(H, S)
        held = torch.ones(H, S, dtype=torch.bool, device=view.keys.device)
        return self.protect_recent(self.score(rows, view.keys, positions, held, view.positions[-1]))

    def decode_scores(self, probs, state, step):
        now = group_max_logits(step.queries, step.keys)                      # [B, H, S]
        ring = (step.positions % self.window_size)[:, None, None]
        state = {name: torch.where(ring == k, now, state[name]) for k, name in enumerate(self.slot_fields)}
        scores = torch.zeros_like(now)
        over = (step.visible.sum(dim=-1) > self.decode_budgets(state, step)).any(dim=-1)  # only these evict
        if bool(over.any()):
            rows = torch.stack(list(state.values()))                          # [α, B, H, S]
            for b in over.nonzero().flatten().tolist():
                scores[b] = self.score(rows[:, b], step.keys[b], step.key_positions[b], step.visible[b],
                                       step.positions[b])
        return scores, state
