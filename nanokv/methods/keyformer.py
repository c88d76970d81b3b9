"""keyformer: accumulated attention, scored through a Gumbel-noised, tempered softmax.

Paper: Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative
Inference (Adnan et al., MLSys 2024), arXiv 2403.09054. Removing tokens shifts the softmax
mass onto those left, which biases plain accumulated attention; Keyformer scores each key with
a regularised softmax instead, softmax((logits + ζ) / τ), ζ i.i.d. Gumbel(0, 1) noise per
(query head, query, key), and accumulates that (averaged over the query heads of a group, GQA)
like H2O. τ rises linearly from `tau_init` at the prompt to `tau_end` after `tau_steps`
decode steps, then stays. Per (layer, kv-head) the newest `recent_ratio` of the budget is never
evicted and the rest goes to the highest scores: after the prompt (its score summed over every
prompt query, at τ = tau_init) and at every decode step, where the lowest-scoring token goes
whenever a head holds one more than its budget. During decode the engine passes probabilities,
not logits: log p differs from the logits by one constant per row, which the softmax cancels,
so softmax((log p + ζ) / τ) is the same thing. With ζ = -log E, E ~ Exponential(1), that is
(p / E)^(1/τ) normalised, which is how it is computed here (no logarithms).

The noise is a hash of (seed, layer, query position, query head, key position), not a draw
from a generator: the same token gets the same noise whatever the batch, slot order or
preemption, so runs repeat and a recompute replays its evictions exactly (`seed` picks another
stream; noise=none drops it, τ alone, for ablation). Defaults from the official code
(d-matrix-ai/keyformer-llm @ f327831, models/*-keyformer-lib `_attn`,
summarization/run_summarization_task.sh): recent window 30% of the cache (`--recent 30`), τ
from 1 to 2 (`--tau_init 1 --tau_end 2`), rising by (tau_end - tau_init) / max_new_tokens per
step with `--max_new_tokens 128`: tau_steps = 128 here, since the method does not see a
request's max_tokens. Its `--kv_cache 60` (60% of the prompt kept) is `--compression 0.4`.

What differs:
- GQA (the official models are MHA): scores averaged over the query heads of a group.
- Hashed noise instead of torch draws, scores accumulated in float32 (official: model dtype).
- Budget: ceil((1 - r) n) here; the official int(prompt x kv_cache / 100) floors.
- A head attends over budget + 1 tokens (the new one) and then evicts; the official mask leaves
  budget - 1 old tokens plus the new one, so attention sees the budget.
- τ stays at tau_end after tau_steps; the official one keeps rising (its script never gets there).
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, hashed_uniform, prompt_logits


def exponential_noise(seed: int, layer: int, q_pos, q_head, k_pos) -> torch.Tensor:
    """Exponential(1) noise E, float32, one value per (seed, layer, query position, query head,
    key position); the tensor arguments broadcast together (int64). -log E is Gumbel(0, 1)."""
    u = hashed_uniform(seed, layer, q_pos, q_head, k_pos)  # in (0, 1), 23 bits: exact in float32
    return -torch.log1p(u - 1)                              # u - 1 is exact too


class Keyformer(DecodeEvictor):
    name = "keyformer"
    description = "accumulated attention from a Gumbel-noised softmax whose temperature rises 1 -> 2 (every step)"
    paper = "https://arxiv.org/abs/2403.09054"
    options = {
        "recent_ratio": (float, 0.3, "a number in [0, 1) (share of the budget kept for the newest tokens)",
                         lambda v: 0 <= v < 1),
        "tau_init": (float, 1.0, "a number > 0 (softmax temperature at the prompt)", lambda v: v > 0),
        "tau_end": (float, 2.0, "a number > 0 (temperature from decode step tau_steps on)", lambda v: v > 0),
        "tau_steps": (int, 128, "an integer >= 1 (decode steps over which the temperature rises)", lambda v: v >= 1),
        "noise": (str, "gumbel", "'gumbel' or 'none'", lambda v: v in ("gumbel", "none")),
        "seed": (int, 0, "an integer >= 0 (which noise)", lambda v: v >= 0),
    }
    slot_fields = {"keyformer_score": torch.float32}

    def recent_window(self, budget):
        return (budget * self.recent_ratio).long()

    def temperature(self, step):
        """τ at decode step `step` (0 is the prompt, 1 the first generated token): a tensor or int."""
        step = torch.as_tensor(step, device=step.device if isinstance(step, torch.Tensor) else "cpu")
        step = step.clamp(min=0, max=self.tau_steps)
        return self.tau_init + (self.tau_end - self.tau_init) * step / self.tau_steps

    def noised(self, probs, tau, layer, q_pos, q_head, k_pos):
        """softmax((log probs + ζ) / τ) over the last dim, as (probs / E)^(1/τ) normalised."""
        if self.noise == "gumbel":
            probs = probs / exponential_noise(self.seed, layer, q_pos, q_head, k_pos).to(probs.device)
        weights = probs.pow(1 / tau)
        return weights / weights.sum(dim=-1, keepdim=True)

    def prompt_scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S] the noised attention each key receives, summed over every prompt query."""
        H, S, _ = view.keys.shape
        T, Hq = view.queries.shape[:2]
        tau = float(self.temperature(0))
        heads = view.head_ids(Hq, view.keys.device)[:, None, None]  # global query heads: the noise is tp=1's
        sums = torch.zeros(H, S, device=view.keys.device)
        for start, logits in prompt_logits(view):
            q_pos = view.positions[S - T + start:S - T + start + logits.shape[1]]
            probs = self.noised(logits.softmax(dim=-1), tau, view.layer, q_pos[None, :, None], heads,
                                view.positions[None, None, :])
            sums += probs.sum(dim=1).view(H, -1, S).mean(dim=1)
        return sums

    def scores(self, view: PrefillView) -> torch.Tensor:
        return self.protect_recent(self.state_of(view)["keyformer_score"].clone())

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        return {"keyformer_score": self.prompt_scores(view)}

    def decode_scores(self, probs, state, step):
        B, H, group, S = probs.shape
        tau = self.temperature(step.positions - step.prompt_lens + 1).to(probs.device)[:, None, None, None]
        heads = step.head_ids(H * group, probs.device).view(1, H, group, 1)
        noised = self.noised(probs, tau, step.layer, step.positions[:, None, None, None], heads,
                             step.key_positions[:, :, None, :])
        score = state["keyformer_score"] + noised.mean(dim=2)
        return score, {"keyformer_score": score}
