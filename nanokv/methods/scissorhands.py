"""scissorhands: evict the token that has most often drawn less than uniform attention lately.

Paper: Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
Compression at Test Time (Liu et al., NeurIPS 2023), arXiv 2305.17118. Persistence of
importance: a token that mattered once goes on mattering. Per (layer, kv-head), over a history
window of the last `history_window` queries, count for each cached token the queries whose
attention to it (averaged over the query heads of the group, GQA) fell below the uniform level
1/t, t the number of tokens that query attended to; the tokens with the highest counts are
dropped, the newest `recent_size` never. The history is a bit mask per token (bit j: the query
j steps ago found it unimportant) held in a slot field with the running count beside it, so it
moves with its token; it starts at prefill from the prompt's last `history_window` queries,
which also pick the prompt tokens kept (the fewest unimportant counts).

The paper compresses in batches: when the cache reaches its budget B it drops the m highest
counts at once, down to B - m, and then grows back for m steps without re-scoring. Here, as for
H2O and TOVA, a head evicts one token whenever it holds B + 1, so it always holds B and scores
every step: m = 1. Among equal counts the oldest token goes (the engine's tie rule; the prefill
selection breaks ties the same way). The paper sets w, r and m per experiment. Defaults: 10
recent tokens (POSITION_WINDOW=10 in the authors' run_infer_opt_66b_sparse_c4.sh) and a
32-query history (ours: at most 62, one int64 mask; that script uses LRU_WINDOW=100).

What differs from the authors' code (lzcemma/Scissorhands @ d0bf444, Decentralized_FM_alpha/
modules/hf_opt_dropkv.py), which only simulates eviction in a teacher-forced C4 perplexity run
on OPT-66B (its generation code is "coming soon"); nanokv follows the paper's budgeted rule:
- There a key stays if its attention was above its query's 90th-percentile attention at least
  once over the last 100 queries (no fixed budget); here the most-often-below-1/t token goes.
- A history of 100 queries there, 32 here (a bit mask of at most 62).
- There only layers 5-35 of 64, from position 100 on, during the prompt; here every layer, from
  prefill on, and at every decode step (the decode-time part is the paper's).
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, observation_attention


class Scissorhands(DecodeEvictor):
    name = "scissorhands"
    description = "evict the token most often attended below uniform over the last queries (every step)"
    paper = "https://arxiv.org/abs/2305.17118"
    options = {
        "history_window": (int, 32, "an integer in [1, 62] (queries whose attention is counted)",
                           lambda v: 1 <= v <= 62),
        "recent_size": (int, 10, "an integer >= 0 (the newest tokens, never evicted)", lambda v: v >= 0),
    }
    slot_fields = {"scissorhands_history": torch.int64, "scissorhands_count": torch.int32}

    def recent_window(self, budget):
        return budget.clamp(max=self.recent_size)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The history of the prompt's last min(w, T) queries: bit j for the query j before the last."""
        H, S, _ = view.keys.shape
        window = min(self.history_window, len(view.queries))
        attention = observation_attention(view, window).view(H, -1, window, S).mean(dim=1)   # [H, W, S]
        seen = view.positions[None, :] <= view.positions[-window:][:, None]                  # [W, S]
        uniform = 1.0 / seen.sum(dim=1, keepdim=True)                                         # [W, 1]
        low = (attention < uniform) & seen                                                    # [H, W, S]
        bits = 2 ** torch.arange(window - 1, -1, -1, device=low.device)                       # newest query: bit 0
        history = (low.long() * bits[None, :, None]).sum(dim=1)
        return {"scissorhands_history": history, "scissorhands_count": low.sum(dim=1).int()}

    def scores(self, view: PrefillView) -> torch.Tensor:
        count = self.state_of(view)["scissorhands_count"].double()
        order = view.positions.double() / (2 * (int(view.positions.max()) + 1))  # ties: the oldest goes
        return self.protect_recent(-count + order[None, :])

    def decode_scores(self, probs, state, step):
        attention = probs.mean(dim=2)                                        # [B, H, S]
        uniform = 1.0 / step.visible.sum(dim=-1, keepdim=True)               # 1 / tokens attended
        low = (attention < uniform) & step.visible
        history, count = state["scissorhands_history"], state["scissorhands_count"]
        w = self.history_window
        leaving = (history >> (w - 1)) & 1                                   # the query w steps ago
        history = ((history << 1) & ((1 << w) - 1)) | low.long()
        count = count - leaving.int() + low.int()
        return -count.float(), {"scissorhands_history": history, "scissorhands_count": count}
