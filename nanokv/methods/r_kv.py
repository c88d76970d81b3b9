"""r_kv: keep what recent queries attend to and is not a near-copy of other cached keys.

Paper: R-KV: Redundancy-aware KV Cache Compression for Reasoning Models (Cai et al., 2025),
arXiv 2505.24133. Long reasoning outputs repeat themselves, so their cache holds many keys that
say the same thing. Per (layer, kv-head), score = λ·I − (1−λ)·R:
- I, importance: each key's attention from the last α queries, taken per query as the max over
  the query heads of the group (GQA), averaged over the α queries, then max-pooled over
  neighbouring keys (kernel 7) so a token's neighbours survive with it;
- R, redundancy: the cosine similarity of the key to every other key, averaged per key, then
  softmaxed over the keys. Before averaging, each key drops its similarity to its most recent
  near-duplicate (the newest other key with cosine > `threshold`), so of a run of copies the
  newest is spared and the oldest counts as most redundant.
The last α tokens are always kept and the top B − α scores fill the rest of the budget B.

Differences from the paper and official code (Zefan-Cai/R-KV):
- It compresses once every 128 generated tokens (buffer) from B + 128 down to B; here, as for
  H2O, a head evicts its lowest score whenever it holds B + 1, so it always holds B and scores
  every step (the redundancy costs O(S² D) per head, computed only for sequences over budget).
- I comes from the attention the engine's decode already computed: the max over the group of
  probabilities (the official code takes the max of logits, then a softmax over all but the
  last α keys). The α queries' rows are kept as α slot fields (`rkv_attention0`..), a ring
  indexed by the query's position mod α, so the cache carries 4α bytes more per token.
- Neighbours for the pooling are the held tokens in position order (the official cache, once
  compressed, is in score order). A key with no near-duplicate drops nothing (the official code
  then drops its similarity to the first key).
- A prompt longer than B is scored the same way at prefill from its last α queries.
Defaults from the official code and the seed table: λ = 0.07, α = 8, kernel 7, threshold 0.5.
"""

import torch
import torch.nn.functional as F

from nanokv.methods.base import DecodeEvictor, PrefillView, observation_attention


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


class RKV(DecodeEvictor):
    name = "r_kv"
    description = "λ·(attention of the last α queries, max-pooled) − (1−λ)·key redundancy; last α kept (every step)"
    paper = "https://arxiv.org/abs/2505.24133"
    options = {
        "window_size": (int, 8, "an integer >= 1 (α: the queries importance is averaged over, and the newest "
                                "tokens, never evicted)", lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1 (the max-pooling width over neighbouring tokens)",
                        lambda v: v >= 1 and v % 2 == 1),
        "mix_lambda": (float, 0.07, "a number in [0, 1] (λ: the weight of importance against redundancy)",
                       lambda v: 0 <= v <= 1),
        "threshold": (float, 0.5, "a number in [-1, 1] (the cosine above which a key is a near-duplicate)",
                      lambda v: -1 <= v <= 1),
    }
    decode_reads = frozenset({"keys"})

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        self.slot_fields = {f"rkv_attention{k}": torch.float32 for k in range(self.window_size)}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for r_kv")

    def recent_window(self, budget):
        return budget.clamp(max=self.window_size)

    def score(self, rows, keys, positions, held):
        """rows [α, H, S]: the last α queries' attention; -> [H, S] λ·I − (1−λ)·R."""
        importance = pooled_in_position_order(rows.mean(dim=0), positions, held, self.kernel_size)
        return self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy(keys, positions, held, self.threshold)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The attention of the prompt's last min(α, T) queries, each in field (its position mod α)."""
        H, S, _ = view.keys.shape
        window = min(self.window_size, len(view.queries))
        attention = observation_attention(view, window)                       # [Hq, W, S]
        attention = attention.view(H, -1, window, S).max(dim=1).values       # [H, W, S]
        state = {name: torch.zeros(H, S, device=view.keys.device) for name in self.slot_fields}
        for w, position in enumerate(view.positions[-window:].tolist()):
            state[f"rkv_attention{position % self.window_size}"] = attention[:, w]
        return state

    def scores(self, view: PrefillView) -> torch.Tensor:
        H, S, _ = view.keys.shape
        rows = torch.stack(list(self.state_of(view).values()))
        positions = view.positions.expand(H, S)
        return self.protect_recent(self.score(rows, view.keys, positions,
                                              torch.ones(H, S, dtype=torch.bool, device=view.keys.device)))

    def decode_scores(self, probs, state, step):
        now = probs.max(dim=2).values                                        # [B, H, S]
        ring = (step.positions % self.window_size)[:, None, None]
        state = {name: torch.where(ring == k, now, state[name]) for k, name in enumerate(self.slot_fields)}
        scores = torch.zeros_like(now)
        over = (step.visible.sum(dim=-1) > step.budgets[:, None]).any(dim=-1)  # only these evict
        if bool(over.any()):
            rows = torch.stack(list(state.values()))                          # [α, B, H, S]
            for b in over.nonzero().flatten().tolist():
                scores[b] = self.score(rows[:, b], step.keys[b], step.key_positions[b], step.visible[b])
        return scores, state
