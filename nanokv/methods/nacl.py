"""nacl: proxy-token attention for most of the budget, attention-weighted random picks for the rest.

Paper: NACL: A General and Effective KV Cache Eviction Framework for LLMs at Inference Time
(Chen et al., ACL 2024), arXiv 2408.03675. One eviction after encoding, per head. Proxy-token
eviction: the last tokens of the prompt (where the question sits) stand in for the queries to
come; a token's score is the attention they give it, summed over them (averaged over the query
heads of a kv-head). As in the official code (flash_attn with causal=False), each proxy's
softmax runs over every prompt key, the later proxies' included. Random eviction: part of the
budget is drawn at random among the tokens the proxy scores left out, without replacement,
token j with probability proportional to exp(score_j) (the official code's softmax over those
scores; drawn here as the top-k of score + Gumbel noise, the same distribution). Per kv-head:
keep `sink_tokens` + the proxy window, then of the rest of the budget a share `random_ratio` at
random and the others by the highest proxy score. The draw is seeded by `seed` and the layer,
so a prompt is compressed the same way whatever it is batched with.

Defaults from the official run (PaddlePaddle/Research @ 46593e1, NLP/ACL2024-NACL, src/args.py;
128K-token inputs): the last 1% of the prompt are the proxies (`proxy_ratio=0.01`, here at least
one token); of the tokens kept by eviction 12% of the prompt go by proxy score and 7% at random,
`random_ratio` = 7/19 = 0.37.
What differs:
- sink_tokens=4 (StreamingLLM's), not 256, for prompts of hundreds or thousands of tokens; the
  official protected 1% of the prompt includes its sinks, here protected = sinks + proxy window.
- the budget B is split, random = round(0.37 (B - protected)); officially each part is a share
  of the prompt length.
- the official code leaves prompts of <= 2048 tokens whole (`min_eviction_seqlen`); here any
  prompt over budget is compressed.
- per kv-head, the proxy attention averaged over the query group (the official code selects per
  query head on its repeat_kv path).
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView, observation_attention


class NACL(PrefillSelector):
    name = "nacl"
    description = "sinks + proxy window; budget by the prompt end's attention, part drawn at random by it (seeded)"
    paper = "https://arxiv.org/abs/2408.03675"
    options = {"proxy_ratio": (float, 0.01, "a number in (0, 1] (share of the prompt, at least 1 token)",
                               lambda v: 0 < v <= 1),
               "random_ratio": (float, 0.37, "a number in [0, 1]", lambda v: 0 <= v <= 1),
               "sink_tokens": (int, 4, "an integer >= 0", lambda v: v >= 0),
               "seed": (int, 0, "an integer", lambda v: True)}

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens={self.sink_tokens} for nacl")

    def proxies(self, S: int) -> int:
        return min(S, max(1, int(self.proxy_ratio * S)))

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S] the proxy tokens' attention, summed over them (the proxy score)."""
        H, S = view.keys.shape[:2]
        summed = observation_attention(view, self.proxies(S), causal=False).sum(dim=1)   # [Hq, S]
        return summed.view(H, -1, S).mean(dim=1)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        keep = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if keep >= S:
            return None
        scores, proxies = self.scores(view), self.proxies(S)
        # protected first: sinks above all, then the proxy window, newest first (a budget smaller
        # than them keeps what StreamingLLM would); the proxy scores are at most `proxies`
        priority = scores.clone()
        priority[:, S - proxies:] = proxies + 1 + torch.arange(proxies, device=scores.device, dtype=torch.float32)
        priority[:, :self.sink_tokens] = float("inf")
        protected = min(S, self.sink_tokens + proxies)
        drawn = round(self.random_ratio * max(0, keep - protected))
        chosen = priority.topk(keep - drawn, dim=-1).indices
        mask = torch.zeros(H, S, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
        if drawn:
            g = torch.Generator().manual_seed(self.seed * 100003 + view.layer)
            draw = view.own_heads(torch.rand(view.total_heads(H), S, generator=g, device="cpu"))  # tp=1's draw
            gumbel = -torch.log(-torch.log(draw.clamp(min=1e-20)))  # same on every device
            sample = (scores + gumbel.to(scores.device)).masked_fill(mask, float("-inf"))
            mask.scatter_(1, sample.topk(drawn, dim=-1).indices, True)
        return mask
