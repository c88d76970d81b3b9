"""gemfilter: an early layer picks the prompt's tokens; the whole model then reruns on those alone.

Paper: Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input
Token Reduction (Zhenmei Shi, Yifei Ming, Xuan-Phi Nguyen, Yingyu Liang, Shafiq Joty; arXiv 2024),
arXiv 2409.17422. Early layers already find what the question needs. So:

    filter pass   the prompt runs through layers 0 .. filter_layer only (their KV is dropped after)
    select        at filter_layer, the prompt's last query scores each key by q . k, summed over
                  all query heads, smoothed by a 1-D average pool (kernel 5); keep the top k
    re-prefill    the k tokens, in prompt order, are prefilled alone through the whole model at
                  new positions 0 .. k - 1; generation follows them (and a question after a
                  (context, question) prompt follows the re-prefilled context)

Every layer then holds k tokens. The budget (--budget / --compression) sets k. Prefill attention
costs about (r + 1) / L + (k / n)^2 of full's (r + 1 of L layers over all n tokens, then all L over
k; causal, quadratic in length), plus the MLPs of r + 1 + L layers instead of L.

Defaults, from the official code (SalesforceAIResearch/GemFilter @ 4899a02): k = 1024
(needle_eval.py --topk); filter layer 13 of Llama-3.1-8B's 32 layers ("13, 14 out of 32"; 19 of 40
for Mistral-Nemo, 19 of 32 for Phi-3.5: needle_eval.py), 0-based as the code's layer_idx; for a
model that is not 32 layers deep `filter_layer=-1` (the default) takes the same share of the depth,
round(13 L / 32). The score (my_baseline/GemFilter/gem_filter_utils.py: find_context,
standard_dis_index): one query, the last prompt token's; raw inner products (no 1/sqrt(D), no
softmax), keys repeated over each GQA group and summed over every query head; avg_pool1d
kernel 5, padding 2, stride 1 (zero padding counted); top min(k, n); sorted back into prompt order
(my_utils/my_generation.py: get_layer_context). Nothing is forced in: the last token (and any
question inside the prompt) stays only if it scores in the top k.

What differs:
- The filter pass stops at the filter layer as the official one does (it truncates model.layers);
  here its KV is freed and the re-prefill starts an empty cache (ModelRunner._refilled_prefill).
- Scores are float32; the official code scores in the model's dtype (fp16), where near-ties can
  fall the other way.
- A budget at least the prompt keeps every token: the re-prefill then equals a plain prefill
  (the official code does the same, top min(k, n) of n).
- Batches: the official code asserts batch size 1; here each sequence of a batch picks its own.
- A (context, question) prompt: the filter pass runs over the context alone (the engine's
  compressed part), so its last token, not the question's, picks; the question is then prefilled
  whole after the picks. The official code filters the whole prompt, question included, with the
  question's last token as the query (and may drop question tokens).
"""

import torch
import torch.nn.functional as F

from nanokv.cache.build import CacheRequest
from nanokv.methods.base import PrefillSelector, PrefillView

PAPER_LAYERS, PAPER_FILTER = 32, 13  # Llama-3.1-8B: filter at layer 13 of 32


class GemFilter(PrefillSelector):
    name = "gemfilter"
    description = "an early layer's last-query attention picks the top tokens; the model reruns on them alone"
    paper = "https://arxiv.org/abs/2409.17422"
    default_budget = 1024  # the official --topk
    options = {
        "filter_layer": (int, -1, "an integer >= 0 below the model's depth, or -1 (13 of 32 layers, scaled)",
                         lambda v: v >= -1),
        "kernel_size": (int, 5, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        # the filter pass ends here; -1 waits for the model's depth (cache_request)
        self.refill_layer = self.filter_layer if self.filter_layer >= 0 else None

    def filter_at(self, num_layers: int) -> int:
        """The filter layer of a num_layers-deep model."""
        if self.filter_layer == -1:
            return min(num_layers - 1, round(PAPER_FILTER * num_layers / PAPER_LAYERS))
        if self.filter_layer >= num_layers:
            raise ValueError(f"option filter_layer={self.filter_layer} of method 'gemfilter' must be in 0 .. "
                             f"{num_layers - 1} for this {num_layers}-layer model (or -1: 13 of 32 layers, scaled)")
        return self.filter_layer

    def cache_request(self, num_layers: int, head_dim: int) -> CacheRequest:
        # the engine asks this once, with the loaded model's depth, before any request: the only
        # place a method learns the depth before its first prefill (the runner reads refill_layer)
        self.refill_layer = self.filter_at(num_layers)
        return super().cache_request(num_layers, head_dim)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        return None  # the filter pass keeps its layers whole (then drops them); the re-prefill keeps all

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        # the filter pass holds layers 0 .. filter_layer whole; after it every layer holds k
        whole = layer <= self.filter_at(num_layers) and self.compresses
        return n if whole else min(n, self.tokens_to_keep(n))

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[S] the last prompt query's q . k, summed over all query heads (every rank's), average-pooled."""
        H, S, D = view.keys.shape
        q = view.queries[-1].float()                                     # [Hq, D]
        keys = view.keys.float().repeat_interleave(q.shape[0] // H, dim=0)  # [Hq, S, D]: GQA as repeat_kv
        summed = view.all_heads(torch.einsum("hd,hsd->hs", q, keys)).sum(dim=0)  # every rank's query heads
        return F.avg_pool1d(summed[None, None], self.kernel_size, stride=1, padding=self.kernel_size // 2)[0, 0]

    def refill(self, view: PrefillView) -> torch.Tensor:
        S = view.keys.shape[1]
        k = self.tokens_to_keep(S)
        chosen = self.scores(view).topk(k).indices
        return torch.zeros(S, dtype=torch.bool, device=view.keys.device).scatter_(0, chosen, True)

