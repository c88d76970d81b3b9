"""a2sf: H2O whose accumulated attention forgets: each new query first scales every score by λ.

Paper: A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in
Transformer Decoder (Jo & Shin, 2024), arXiv 2407.20485. H2O sums the attention a token
received, so under a causal mask an early token has been scored by more queries than a late
one and wins for that reason alone. A2SF weighs query q's attention by λ^(age of q): per
(layer, kv-head), score_t = λ · score_(t-1) + a_t, where a_t is the current query's attention
(averaged over the query heads of the group, GQA). At prefill the score is the prompt's
attention rows weighted the same way, Σ_i λ^(T-1-i) a_i over the T prompt queries (rows whose
weight λ^(T-1-i) is below 1e-12 are skipped: together they move no score by more than
1e-12 / (1 - λ)). The newest `recent_size` tokens are never evicted; the rest of the budget
goes to the highest scores, and during decode the lowest-scoring token goes whenever a head
holds one more than its budget. λ = 1 is H2O with a fixed recent window.

Defaults: forgetting factor 0.95, the value in the official repository's README example
(Dirac-Notation/A2SF @ 00a617f; its code takes λ from a config, script/a2sf_test.sh passes
0.99), and a recent window of 16 tokens (its policies' recent_budget default). The paper
(arXiv 2407.20485) treats λ as a factor in (0, 1) to choose; the value it used could not be
verified here (the stored copies of the paper hold its abstract and introduction only), so the
default is the repository's.

What differs: the repository's history starts in 2025, after the paper, so the code compared
with is that later one. GQA: scores averaged over the query heads of each group.
"""

import math

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, prompt_logits

NEGLIGIBLE = 1e-12  # prefill rows weighted below this are skipped


class A2SF(DecodeEvictor):
    name = "a2sf"
    description = "H2O with a forgetting factor: accumulated attention decays by `forgetting` per query (every step)"
    paper = "https://arxiv.org/abs/2407.20485"
    options = {
        "forgetting": (float, 0.95, "a number in (0, 1] (the factor λ each older query's attention is weighed by; "
                                    "1 is H2O's plain sum)", lambda v: 0 < v <= 1),
        "recent_size": (int, 16, "an integer >= 0 (the newest tokens, never evicted)", lambda v: v >= 0),
    }
    slot_fields = {"a2sf_score": torch.float32}

    def recent_window(self, budget):
        return budget.clamp(max=self.recent_size)

    def weighted_sums(self, view: PrefillView) -> torch.Tensor:
        """[H, S] Σ_i λ^(T-1-i) a_i over the prompt's queries i, a_i averaged over each group."""
        H, S, _ = view.keys.shape
        T = len(view.queries)
        lam = self.forgetting
        horizon = T if lam == 1 else min(T, math.ceil(math.log(NEGLIGIBLE) / math.log(lam)) + 1)
        sums = torch.zeros(H, S, device=view.keys.device)
        for start, logits in prompt_logits(view, T - horizon):
            probs = logits.softmax(dim=-1)                                             # [Hq, c, S]
            age = T - 1 - torch.arange(start, start + probs.shape[1], device=probs.device)
            weights = (math.log(lam) * age.double()).exp().float()                    # λ^age
            sums += (probs * weights[None, :, None]).sum(dim=1).view(H, -1, S).mean(dim=1)
        return sums

    def scores(self, view: PrefillView) -> torch.Tensor:
        return self.protect_recent(self.state_of(view)["a2sf_score"].clone())

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        return {"a2sf_score": self.weighted_sums(view)}

    def decode_scores(self, probs, state, step):
        score = self.forgetting * state["a2sf_score"] + probs.mean(dim=2)
        return score, {"a2sf_score": score}
