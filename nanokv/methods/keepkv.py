"""keepkv: evict by recent attention; merge what goes into its most similar kept slot, output unchanged.

Paper: KeepKV: Eliminating Output Perturbation in KV Cache Compression for Efficient LLMs Inference
(Tian, Wang, Peng, Yuan, Wang, Yi, Liu, Cui, Yang; v2 retitled "Achieving Periodic Lossless KV
Cache Compression"), arXiv 2504.09936, official code kkvcache/KeepKV. Merging what eviction drops
keeps information, but an averaged slot draws a different share of attention than the tokens it
replaced, which perturbs every later output. KeepKV keeps that share.

Electoral votes: each slot carries c, how many original tokens it stands for (1 for a new one),
and attention weighs it c exp(q.k): its logit plus log c. The cache holds log c in a slot field
that every attention over it adds (`attention_bias`; kernels/__init__.py), so merged slots read
as c copies in the decode kernels (plain torch, C++, Triton) and in a prefill over the cache.
ZIP merging: the tokens i merged into one slot (logits l_i = q.k_i / sqrt(D) + log c_i for the
current query q) become one slot with c = sum c_i, v = sum w_i v_i with w_i = softmax_i(l_i),
and a key whose logit is log(sum exp l_i) - log c: the weighted mean key sum w_i k_i moved along
q until q.k has that value. The merged slot then draws exactly the attention and output the
tokens did, for q (the paper's single-step losslessness); later queries see a close one.

Here, per (layer, kv-head): the newest `recent_ratio` of the budget and the first `sink_tokens`
stay; the rest go by a score, an exponential moving average of the attention per vote (the
slot's attention / c) with horizon the recent window (decay 1 - 1/window), started at prefill
from the prompt's last `window` queries. A head over budget evicts its lowest; the victim merges
into the kept key of highest cosine similarity if that reaches `similarity_threshold`, else it is
dropped. At prefill every evicted prompt token is merged the same way at once, with the last
prompt query as q. A merged slot's score is the vote-weighted mean of its tokens' scores.

Defaults (official code kkvcache/KeepKV @ 7f69213, run_helm.py and
utils_hh/modify_llama_oursk.py): similarity_threshold=0.8 (`sketch_similarity_threshold`, the
same at prefill), sink_tokens=4 (`pyramidinfer_sink_len`), recent_ratio=0.5 (`heavy_ratio` =
`recent_ratio` = 0.1 of the prompt: half and half).
What differs:
- the score: the official code sums each slot's unnormalized exp(q.k) over the last recent-window
  queries (weighted 1 to 1.2, `pyramidinfer_distance_weight`); here an EMA of the softmax
  attention per vote with that horizon (the paper's v2 predicts attention with an EMA).
- the merge weights: the official code weighs each token by c times its recent-window mean exp
  score (+ a float16 epsilon) and averages K and V with them; here the current query's weights,
  and the key moved along q, which is what makes the current output unchanged (the paper's ZIP).
- GQA (the official code is MHA): the group's query heads share one merged slot, so v takes the
  group's mean weights and k is moved along the group's mean query to the mean target logit: exact
  for one query head per kv-head, close otherwise.
- budgets are the request's tokens per head (budget= or compression=), not ratios of each prompt;
  evictions start at the end of prefill, then one per decode step.
- ties (similarity, score) go to the oldest token, similarities compared to 2^-12, so a recompute
  (other batches, other rounding) replays the same merges.
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import DecodeEvictor, DecodeStep, Merger, PrefillView, observation_attention


def zip_merge(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, log_votes: torch.Tensor,
              scores: torch.Tensor, into: torch.Tensor) -> dict[str, torch.Tensor]:
    """ZIP merging for N rows (heads) at once. q [N, g, D]: the current query heads of each row,
    already scaled by 1 / sqrt(D); keys, values [N, S, D] float32; log_votes, scores [N, S];
    into [N, S] long: the slot each slot's token ends in (itself, a target, or -1: not merged).
    -> new keys, values, log_votes and scores [N, S(, D)]: each slot that receives another
    token holds the merge of its members; every other slot is as it was."""
    member = into >= 0
    at = into.clamp(min=0)
    logits = torch.einsum("ngd,nsd->ngs", q, keys) + log_votes[:, None]                   # [N, g, S]
    logits = logits.masked_fill(~member[:, None], float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight = torch.exp(logits - top)                                                      # 0 off the members
    total = torch.zeros_like(weight).scatter_add_(-1, at[:, None].expand_as(weight), weight)
    share = torch.where(member[:, None], weight / total.gather(-1, at[:, None].expand_as(weight)), 0.0)
    share = share.mean(dim=1)                                                             # [N, S] the group's mean

    def gathered(x):  # sum of share x over each target's members -> [N, S, D]
        return torch.zeros_like(x).scatter_add_(1, at[..., None].expand_as(x), share[..., None] * x)

    mean_key, value = gathered(keys), gathered(values)
    votes = torch.where(member, log_votes.exp(), 0.0)
    count = torch.zeros_like(votes).scatter_add_(-1, at, votes)
    score = torch.zeros_like(votes).scatter_add_(-1, at, votes * scores) / count.clamp(min=1e-30)
    # the logit the merged slot needs per vote: log(sum of its members' exp l) - log c
    target = (total.log() + top - count.clamp(min=1e-30).log()[:, None]).mean(dim=1)        # [N, S]
    q_mean = q.mean(dim=1)                                                                # [N, D]
    shift = target - torch.einsum("nsd,nd->ns", mean_key, q_mean)
    key = mean_key + (shift / (q_mean * q_mean).sum(-1, keepdim=True).clamp(min=1e-30))[..., None] * q_mean[:, None]
    merged = torch.zeros_like(votes, dtype=torch.long).scatter_add_(-1, at, member.long()) > 1
    return {"k": torch.where(merged[..., None], key, keys), "v": torch.where(merged[..., None], value, values),
            "keepkv_log_votes": torch.where(merged, count.clamp(min=1e-30).log(), log_votes),
            "keepkv_score": torch.where(merged, score, scores)}


SIMILARITY_GRID = 4096.0


def most_similar(keys: torch.Tensor, evicted: torch.Tensor, candidates: torch.Tensor, positions: torch.Tensor,
                 chunk: int = 256):
    """For keys [N, S, D] and the slots evicted [N, E] whose keys want a place, the candidate slot
    (candidates [N, S] bool) of highest cosine similarity, the oldest (positions [N, S]) among
    equals -> (similarity, slot), each [N, E]. `chunk` evicted rows at a time (a prompt's
    [E, S] similarities would not fit)."""
    unit = F.normalize(keys.float(), dim=-1)
    positions = positions.long()
    bests, slots = [], []
    for part in evicted.split(chunk, dim=1):
        gone = unit.gather(1, part[..., None].expand(-1, -1, unit.shape[-1]))             # [N, e, D]
        similarity = gone @ unit.transpose(1, 2)                                         # [N, e, S]
        # compared on a grid of 2^-12: a token repeated at d positions before and after the evicted
        # one ties exactly (RoPE), and the last bits of keys change with the batch's matmul shapes
        similarity = (similarity * SIMILARITY_GRID).round() / SIMILARITY_GRID
        similarity = similarity.masked_fill(~candidates[:, None], float("-inf"))
        best = similarity.max(dim=-1, keepdim=True).values
        oldest = positions[:, None].expand_as(similarity).masked_fill(similarity != best, torch.iinfo(torch.int64).max)
        bests.append(best[..., 0])
        slots.append(oldest.argmin(dim=-1))
    return torch.cat(bests, dim=1), torch.cat(slots, dim=1)


class KeepKV(DecodeEvictor, Merger):
    name = "keepkv"
    description = ("evict by recent attention; merge each evicted token into its most similar kept one with "
                   "vote counts, so the current output is unchanged")
    paper = "https://arxiv.org/abs/2504.09936"
    options = {
        "recent_ratio": (float, 0.5, "a number in (0, 1) (share of the budget kept for the newest tokens)",
                         lambda v: 0 < v < 1),
        "sink_tokens": (int, 4, "an integer >= 0 (first tokens never evicted)", lambda v: v >= 0),
        "similarity_threshold": (float, 0.8, "a number in [-1, 1] (least key cosine similarity that merges)",
                                 lambda v: -1 <= v <= 1),
    }
    needs_values = True
    decode_reads = frozenset({"keys", "values", "queries"})
    slot_fields = {"keepkv_score": torch.float32, "keepkv_log_votes": torch.float32}
    attention_bias = "keepkv_log_votes"

    def check_budget(self):
        if self.budget is not None and self.budget - int(self.budget * self.recent_ratio) <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must leave room for a token past sink_tokens={self.sink_tokens} "
                             f"and the recent window ({int(self.budget * self.recent_ratio)} tokens) for keepkv")

    def recent_window(self, budget):
        return (budget * self.recent_ratio).long()

    def decay(self, budget):
        """The EMA's decay: 1 - 1 / (the recent window, at least 1)."""
        return 1 - 1 / self.recent_window(budget).clamp(min=1).float()

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The EMA over the prompt's last `window` queries (the recent window of the budget),
        started at 0: query i of W weighs (1 - decay) decay^(W - 1 - i)."""
        H, S, _ = view.keys.shape
        budget = torch.tensor(self.decode_budget(S), device=view.keys.device)
        window = int(min(S, max(1, int(self.recent_window(budget)))))
        decay = self.decay(budget)
        attention = observation_attention(view, window)                                   # [Hq, W, S]
        attention = attention.view(H, -1, window, S).mean(dim=1)                          # the group's mean
        age = torch.arange(window - 1, -1, -1, device=attention.device)
        weights = (1 - decay) * decay ** age.float()
        score = (attention * weights[None, :, None]).sum(dim=1)
        return {"keepkv_score": score, "keepkv_log_votes": torch.zeros_like(score)}

    def protect(self, scores, positions):
        """Sinks (the first sink_tokens positions) score +inf; the recent window is the engine's."""
        return scores.masked_fill(positions < self.sink_tokens, float("inf"))

    def scores(self, view: PrefillView) -> torch.Tensor:
        scores = self.state_of(view)["keepkv_score"].clone()
        return self.protect_recent(self.protect(scores, view.positions[None]))

    def merge(self, view: PrefillView, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        H, S, D = view.keys.shape
        state = self.state_of(view)
        keys, values = view.keys.float(), view.values.float()
        positions = view.positions[None].expand(H, S)
        similarity, target = most_similar(keys, torch.arange(S, device=keys.device).expand(H, S), keep, positions)
        slots = torch.arange(S, device=keys.device).expand(H, S)
        into = torch.where(keep, slots, torch.where(similarity >= self.similarity_threshold, target, -1))
        q = view.queries[-1].float().view(H, -1, D) / math.sqrt(D)                       # the last prompt query
        return zip_merge(q, keys, values, state["keepkv_log_votes"], state["keepkv_score"], into)

    def decode_scores(self, probs, state, step: DecodeStep):
        per_vote = probs.mean(dim=2) / state["keepkv_log_votes"].exp()
        decay = self.decay(step.budgets)[:, None, None]
        score = decay * state["keepkv_score"] + (1 - decay) * per_vote
        return self.protect(score, step.key_positions), {"keepkv_score": score}

    def merge_evicted(self, victim, evicting, state, step: DecodeStep) -> dict[str, torch.Tensor]:
        b, H, S, D = step.keys.shape
        flat = lambda x: x.reshape(b * H, *x.shape[2:])                                   # noqa: E731
        keys, values, visible = flat(step.keys.float()), flat(step.values.float()), flat(step.visible)
        victim, positions = victim.reshape(b * H, 1), flat(step.key_positions)
        others = visible.scatter(-1, victim, False)
        similarity, target = most_similar(keys, victim, others, positions)               # [bH, 1]
        merging = flat(evicting)[:, None] & (similarity >= self.similarity_threshold)
        into = torch.full_like(positions, -1, dtype=torch.long)
        into = into.scatter(-1, target, target).scatter(-1, victim, torch.where(merging, target, -1))
        q = step.queries.float().view(b * H, -1, D) / math.sqrt(D)
        merged = zip_merge(q, keys, values, flat(state["keepkv_log_votes"]), flat(state["keepkv_score"]), into)
        return {name: x.view(b, H, *x.shape[1:]) for name, x in merged.items()}
