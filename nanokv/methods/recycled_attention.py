"""recycled_attention: attend fully now and then, and in between recycle what that step attended to.

Paper: Recycled Attention: Efficient inference for long-context language models (Xu, Goyal,
Choi), arXiv 2411.05787; its later version, RefreshKV: Updating Small KV Cache During Long-form
Generation (ACL 2025), states the algorithm in full (Algorithm 1, Section 2.2, Appendix A.1/A.3).
Consecutive tokens attend to much the same context, so a step that attends over the whole cache
tells the next ones what to read. Per sequence and layer:

    full step (every `stride` steps)  attend to every token; rank them by this query's attention
                                      (each kv-head: the max over its query heads, max-pooled over
                                      `kernel_size` neighbouring tokens, as SnapKV)
    partial step (the others)         attend to `budget` tokens: every token since the last full
                                      step, then the best-ranked of that step's top `budget`

The partial cache is the paper's C_p: it starts as the full step's top K, and each new token
goes in while the lowest-ranked one goes out, so it holds K tokens throughout. The cache itself
is kept whole; prefill is dense. `schedule=query` is the paper's adaptive variant: every `stride`
steps a layer compares its query (averaged over all query heads) with the one of its last full
step and attends fully only when their cosine similarity is below `threshold`.

Defaults (RefreshKV, Section 3 and Tables 1, 3, 4): stride 10 (the fixed schedule S=10; the
query schedule's QC stride of 5 or 10), kernel_size 7 and an observation window of one query
(App. A.1, after SnapKV), the max over the group for GQA (App. A.3: max beat mean and the first
head), threshold 0.85 (Llama-3.1-8B; 0.95 for Qwen2-7B), a budget of 2048 tokens when none is
given (Table 1; the paper otherwise sets K to 1/8 of the input).

Bytes, per (layer, head): a full step reads every token's K and V once. The ranking needs that
step's attention probabilities; a kernel that returns them with its output (as the engine's
decode kernel does for H2O) reads nothing more, so the scoring counts 0 here (this file
computes them from step.keys apart; the paper's FlashAttention path recomputes them, App. A.1,
and would read the keys once more). A partial step reads `budget` tokens' K and V.

What differs:
- The paper's first C_p comes from the prompt's last token at prefill; here the first decode
  step is a full step (the reader sees decode steps only), and the schedule counts from it.
- The fixed schedule is kept per sequence (continuous batching starts sequences at different
  steps): a batch may mix full and partial steps in one layer, read as single slots.
- A recompute after preemption runs its generated tokens densely and starts the schedule afresh.
- No continued pre-training (Section 6).
"""

import torch

from nanokv.methods.base import PageReader, Picks, ReadStep, top_slots

SCHEDULES = ("fixed", "query")


class RecycledAttention(PageReader):
    name = "recycled_attention"
    description = ("query-aware sparse decode: attend fully every few steps, in between only to the tokens "
                   "that step attended to most (cache kept whole)")
    paper = "https://arxiv.org/abs/2411.05787"
    default_budget = 2048
    options = {
        "stride": (int, 10, "an integer >= 1 (decode steps from one full step, or check, to the next)",
                   lambda v: v >= 1),
        "kernel_size": (int, 7, "an odd integer >= 1 (tokens the ranking's max-pool spans)",
                        lambda v: v >= 1 and v % 2 == 1),
        "schedule": (str, "fixed", f"one of {', '.join(SCHEDULES)}", lambda v: v in SCHEDULES),
        "threshold": (float, 0.85, "a number in (0, 1] (schedule=query: attend fully below this cosine similarity)",
                      lambda v: 0 < v <= 1),
    }

    def ranking(self, step: ReadStep, held: torch.Tensor) -> torch.Tensor:
        """[b, H, budget] the slots this query attends to most, best first (-1 after)."""
        b, H, S = held.shape
        probs = step.logits().softmax(dim=-1).amax(dim=2)  # the group's most attentive query head
        pad = self.kernel_size // 2
        pooled = torch.nn.functional.max_pool1d(probs.view(b * H, 1, S), self.kernel_size, 1, pad).view(b, H, S)
        # pooling makes plateaus of equal scores: the older token first, whatever the sort
        pooled, order = pooled.masked_fill(~held, float("-inf")).sort(dim=-1, descending=True, stable=True)
        ranked = order[..., :self.budget].masked_fill(pooled[..., :self.budget] == float("-inf"), -1)
        return torch.nn.functional.pad(ranked, (0, self.budget - ranked.shape[-1]), value=-1)

    def pick(self, step: ReadStep) -> Picks:
        held, k = step.held(), self.budget
        (b, H, S), device = held.shape, held.device
        mine = [state.setdefault(step.layer, {"count": 0}) for state in step.states]
        due = [m["count"] % self.stride == 0 for m in mine]  # a full step (fixed) or a check (query)
        fresh = ["ranked" not in m for m in mine]
        for m in mine:
            m["count"] += 1
        if all(fresh) or (self.schedule == "fixed" and all(due)):  # every sequence attends fully
            self.remember(mine, torch.ones(b, dtype=torch.bool, device=device), self.ranking(step, held), step)
            pages = torch.arange(S // step.block_size, device=device).expand(b, H, -1)
            return Picks(pages=pages.masked_fill(pages * step.block_size >= step.lengths[..., None], -1))

        # a partial step: every token since the last full step (newest first), then the recycled ranking
        ranked = torch.stack([m.get("ranked", torch.full((H, k), -1, device=device)) for m in mine])
        since = torch.stack([m.get("held", torch.zeros(H, dtype=torch.long, device=device)) for m in mine])
        scores = torch.full((b, H, S + 1), float("-inf"), device=device)
        rank_value = torch.arange(k, 0, -1, device=device, dtype=scores.dtype).expand(b, H, k)
        scores.scatter_(-1, torch.where(ranked < 0, S, ranked), rank_value)
        slot = torch.arange(S, device=device)
        new = held & (slot >= since[..., None])
        scores = torch.where(new, 2 * k + slot.to(scores.dtype), scores[..., :S])
        slots = top_slots(scores, k)
        if not any(due):
            return Picks(slots=slots)

        if self.schedule == "fixed":
            full = torch.tensor(due, device=device)
        else:
            query = step.queries.float().mean(dim=1)
            last = torch.stack([m.get("query", torch.zeros_like(query[0])) for m in mine])
            similar = torch.nn.functional.cosine_similarity(query, last, dim=-1) >= self.threshold
            full = torch.tensor(fresh, device=device) | (torch.tensor(due, device=device) & ~similar)
        self.remember(mine, full, self.ranking(step, held), step)
        every = torch.where(held, slot, -1)
        slots = torch.nn.functional.pad(slots, (0, S - slots.shape[-1]), value=-1)
        return Picks(slots=torch.where(full[:, None, None], every, slots))

    def remember(self, mine: list[dict], full: torch.Tensor, ranked: torch.Tensor, step: ReadStep):
        """Keep, for the sequences attending fully now, this step's ranking, what each head holds
        (the tokens after it are new to the next steps) and the mean query (schedule=query)."""
        query = step.queries.float().mean(dim=1)
        for i, m in enumerate(mine):
            for name, now in (("ranked", ranked[i]), ("held", step.lengths[i].long()), ("query", query[i])):
                m[name] = torch.where(full[i], now, m[name]) if name in m else now
