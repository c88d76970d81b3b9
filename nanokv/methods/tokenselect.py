"""tokenselect: read the tokens the query heads vote for, one by one, and reuse the vote while the query holds.

Paper: TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic
Token-Level KV Cache Selection (Wu, Pan et al., EMNLP 2025), arXiv 2411.02886. Each decode step
every query head h scores every candidate token j (those after the `sinks` first and before the
`local` newest) by q_h . k_j and takes a softmax over the candidates, so a head with large logits
gets no more say than the others; the heads' probabilities are summed (a soft vote) and the top
budget - sinks - local candidates are read with the sinks and the local window, the same tokens by
every head of the layer (GQA: the official vote sums every query head, across kv-heads too).
Selection Cache: while the query stays close to the one that last voted (cosine similarity above
`theta`), a layer reuses that vote and scores nothing.

Defaults: the official code (pzs19/TokenSelect @ bbc60fd): n_init 128 (`sinks`), n_local 512
(`local`), top_k 2048 in config/qwen-token-retrieval.yaml and llama-token-retrieval.yaml, hence the
default budget 128 + 2048 + 512 = 2688; the similarity threshold 0.9 of
patcher/token_retrieval.py (TokenRetriever.similarity_threshold); the vote as its
get_topk_tokens: unscaled q . k, a softmax per query head, summed over every query head of the
layer; a sequence holding no more than the budget reads everything (retrieval_indices).

What differs:
- A budget below the official 2,688 shrinks `sinks` and `local` in proportion (budget 256: 12 and
  48) unless they are given; the official code has no budget, only these three sizes.
- The official cache holds keys before RoPE: it rotates the scoring query to the fixed position
  n_local, so every candidate is scored as if it sat n_local tokens back, and its attention gives
  the read tokens new consecutive positions (the length extrapolation). The engine stores keys after
  RoPE and attends with each token's own position, so the vote here scores the logits attention
  will see.
- The released code ships with the Selection Cache off (QUERY_CACHE = False in patch()); it is
  on here, as in the paper. The query it compares is the whole layer's (every head's, flattened),
  with RoPE undone (the official compares queries rotated to one fixed position: the same angle);
  the cache reuses a vote when the similarity is above theta (official: not below), so theta=1
  votes anew every step.
- The vote is computed in float32 (the official kernel writes bfloat16 scores); its optional
  max-pool smoothing of the vote (kernel_size, off by default) is left out.
- The official retriever serves one request at a time; here each sequence keeps its own Selection
  Cache (ReadStep.states), so batched sequences never reuse each other's votes.
- The prefill is dense (the official also selects per 512-token prefill chunk), as is a recompute
  after preemption, which starts the Selection Cache afresh.
"""

import math

import torch
import torch.nn.functional as F

from nanokv.methods.base import PageReader, Picks, ReadStep, scaled_windows, slot_mask, top_slots
from nanokv.methods.reattention import unrotated


class TokenSelect(PageReader):
    name = "tokenselect"
    description = "query-aware sparse decode: the tokens the query heads soft-vote for, reused while the query holds"
    paper = "https://arxiv.org/abs/2411.02886"
    default_budget = 2688
    options = {
        "sinks": (int, 128, "an integer >= 0", lambda v: v >= 0),
        "local": (int, 512, "an integer >= 0", lambda v: v >= 0),
        "theta": (float, 0.9, "a number in [0, 1] (1: vote anew every step)", lambda v: 0 <= v <= 1),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        options = scaled_windows(options, budget, self.default_budget, {"sinks": 128, "local": 512})
        super().__init__(compression, budget, **options)

    def check_budget(self):
        if self.budget <= self.sinks + self.local:
            raise ValueError(f"budget={self.budget} must exceed sinks + local = {self.sinks + self.local} for "
                             f"tokenselect (the rest is what the heads vote for); lower them with the sinks= and "
                             f"local= options")

    def pick(self, step: ReadStep) -> Picks:
        b, H, S, D = step.keys.shape
        k = self.budget - self.sinks - self.local
        n = step.lengths[:, 0]  # nothing is evicted: every head holds the same tokens in the same slots
        slot = torch.arange(S, device=n.device)
        candidate = (slot >= self.sinks) & (slot < (n - self.local)[:, None])  # [b, S]
        sparse = n > self.budget

        # the Selection Cache: the query that last voted and its vote, per layer of each sequence
        query = unrotated(step.queries, step.positions[:, None].expand(step.queries.shape[:2]), step.inv_freq,
                          self.name)
        query = step.all_heads(query).flatten(1)  # the whole layer's query: every rank's heads (RankHeads)
        empty = (torch.zeros_like(query[0]), torch.full((k,), -1, device=n.device),
                 torch.zeros((), dtype=torch.bool, device=n.device))
        kept = [state.get("tokenselect", {}).get(step.layer, empty) for state in step.states]
        voter, vote, valid = (torch.stack(part) for part in zip(*kept))
        similarity = F.cosine_similarity(query, voter, dim=-1).clamp(max=1.0)  # theta=1: never reused
        reuse = valid & (similarity > self.theta) & sparse

        # the vote: unscaled q . k, a softmax over the candidates per query head, summed over all heads;
        # computed for the whole batch (no wait for the host), its bytes counted where it is used
        logits = step.logits() * math.sqrt(D)
        probs = logits.masked_fill(~candidate[:, None, None], float("-inf")).softmax(dim=-1)
        votes = step.all_heads(probs.nan_to_num(0.0).sum(dim=2)).sum(dim=1)  # over every rank's heads
        votes = torch.where(candidate, votes, float("-inf"))
        fresh = top_slots(votes, k)
        fresh = F.pad(fresh, (0, k - fresh.shape[-1]), value=-1)
        chosen = torch.where(reuse[:, None], vote, fresh)
        # rows by unbind: one call for the batch, not a few small ops per sequence (Python-bound on a CPU)
        kept = zip(torch.where(reuse[:, None], voter, query).unbind(0), chosen.unbind(0), sparse.unbind(0))
        for state, row in zip(step.states, kept):
            state.setdefault("tokenselect", {})[step.layer] = row

        read = slot_mask(chosen, S) | (slot < self.sinks) | (slot >= (n - self.local)[:, None]) | ~sparse[:, None]
        read &= slot < n[:, None]
        slots = top_slots(torch.zeros(b, S, device=n.device).masked_fill(~read, float("-inf")), self.budget)
        scored = (candidate.sum(-1) * (sparse & ~reuse)).sum() * H * (D * step.itemsize)
        return Picks(slots=slots[:, None].expand(b, H, -1), scored_bytes=scored)
