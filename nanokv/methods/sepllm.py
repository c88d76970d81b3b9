"""sepllm: attention sinks, the separator tokens, and a recent window.

Paper: SepLLM: Accelerate Large Language Models by Compressing One Segment into One Separator
(Chen et al., 2024), arXiv 2412.12094; the training-free variant. A segment's information
gathers in the separator that ends it (punctuation, a line break), so the cache keeps the first
`a` tokens (sinks), the KV of the separators, up to the `s` most recent of them, and a local
window of the `w` newest tokens; everything else is dropped, one-shot after prefill, the same in
every layer and head.

Separators are the official SepCache llama list, by text: a token whose decoded text is one of
. , ? ! ; : and a line break, alone or after one space (" ." and " \n" count), or is made only
of spaces (" ", "  "); "\n\n", ".\n", "..." and "!?" are not separators. The engine hands the
vocabulary over (`needs_vocabulary`, see base.py); BOS is the first sink anyway.

Budget: the request's budget B (per layer and head) is a + s + w. a = sink_tokens; of the rest
a `separator_share` goes to separators, s = floor((B - a) x share), and w = B - a - s to the
window. The default share 0.2 is the paper's split at its cache size c = 324: a=4, s=64, w=256.
When the prompt has fewer than s separators before the window, the unused room goes to the
window (the tokens just before it), so a head always holds B tokens.

Defaults: sink_tokens=4 (paper; SepCache's init_cache_size), separator_share=0.2 (paper's s=64
of s + w = 320); separators from HKUDS/SepLLM @ f250f59 (TrainingFree llama3 configs) and SepCache
(transformers-community/sep_cache @ e95635e).
What differs:
- s caps the separators as SepCache's USE_MAX_SEP_CACHE does; the mask-based training-free runs
  keep every separator (and use a=3, w=256 fixed).
- one shot after a dense prefill; SepCache compresses on decode whenever the cache reaches c, and
  the mask-based runs also sparsify the prompt's own attention (the stored K/V of layers >= 1).
- generated tokens are never evicted.
- every all-space token is a separator; the llama list holds three of them (ids 220, 256,
  262), so other runs of spaces count here and not there.
"""

import torch

from nanokv.methods.base import PrefillSelector, PrefillView

SEPARATORS = frozenset(".,?!;:\n")


def is_separator(text: str) -> bool:
    """SepCache's llama separator ids, by text: one of . , ? ! ; : \\n, with at most one space
    before it, or a token made only of spaces."""
    if text.startswith(" ") and len(text) == 2:
        text = text[1:]
    return text in SEPARATORS or (text != "" and set(text) == {" "})


class SepLLM(PrefillSelector):
    name = "sepllm"
    description = "keep the first tokens, the most recent separators (punctuation, line breaks) and a recent window"
    paper = "https://arxiv.org/abs/2412.12094"
    options = {"sink_tokens": (int, 4, "an integer >= 0", lambda v: v >= 0),
               "separator_share": (float, 0.2, "a number in [0, 1)", lambda v: 0 <= v < 1)}
    needs_vocabulary = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.separator_ids = None  # [vocab] bool, from bind_vocabulary

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens={self.sink_tokens} for sepllm")

    def bind_vocabulary(self, texts: list[str]):
        self.separator_ids = torch.tensor([is_separator(t) for t in texts], dtype=torch.bool, device="cpu")

    def split(self, budget: int) -> tuple[int, int, int]:
        """(sinks a, most separators s, window w) of a head holding `budget` tokens."""
        a = min(self.sink_tokens, budget)
        s = int((budget - a) * self.separator_share)
        return a, s, budget - a - s

    def scores(self, view: PrefillView) -> torch.Tensor:
        if view.token_ids is None or self.separator_ids is None:
            raise ValueError("sepllm needs the prompt's token ids and the vocabulary (the engine gives both)")
        H, S = view.keys.shape[:2]
        a, s, w = self.split(min(S, self.layer_budget(S, view.layer, view.num_layers)))
        device = view.keys.device
        ids = view.token_ids.to(device)
        known = ids < len(self.separator_ids)
        separator = torch.zeros(S, dtype=torch.bool, device=device)
        separator[known] = self.separator_ids.to(device)[ids[known]]
        recency = torch.arange(S, dtype=torch.float32, device=device)   # the rest: the newest first
        middle = torch.arange(S, device=device) < S - w
        middle[:a] = False
        chosen = (separator & middle).nonzero().flatten()[-s:] if s else torch.zeros(0, dtype=torch.long, device=device)
        scores = recency.clone()
        scores[chosen] += S                                       # the s latest separators outside the window
        scores[S - w:] += 2 * S                                   # the window
        scores[:a] = float("inf")                                 # the sinks
        return scores.expand(H, S)
