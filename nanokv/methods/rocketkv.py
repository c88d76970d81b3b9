"""rocketkv: evict coarsely at prefill, then read each step only the top of an approximate attention.

Paper: RocketKV: Accelerating Long-Context LLM Inference via Two-Stage KV Cache Compression
(Behnam, Fu, Zhao, Tsai, Yu, Tumanov; ICML 2025), arXiv 2502.14051. Official code NVlabs/RocketKV
@ 63637c8: gpt-fast/rocket.py (get_params_for_token_budget, rocket_attn) and, for the paper's
accuracy runs, pipeline/inf_stream_llm/inf_llm/attention/rocket.py with infllm_utils.py compress().

One token budget B (tokens read per kv-head and decode step, as quest) sets both stages. With n
prompt tokens, c = max(1, n / B) and a = min(0.2 + 0.06 log2 c, 0.8):

1. SnapKV++ at prefill, permanent: every layer keeps int(n / c^a) tokens per kv-head (B c^(1-a),
   between B and n): the last `window_size` prompt tokens and the prefix tokens the window attends
   to most, the window's softmax attention summed over the window's queries and over the query
   heads of the kv-head (GQA: one selection per kv-head), max-pooled with `kernel_size`.
2. Hybrid sparse attention at decode. With h tokens held (c2 = max(1, h / B)), each page's
   attention is approximated on r = round(D * page / c2) channels (1 to D), those where |q| summed
   over the group is largest (head-dimension reduction), from the page's key bounds (sequence
   reduction): q_c times the page's largest key in channel c where the group's q_c sum is positive,
   else its smallest. Each query head's approximate logits are divided by sqrt(D * sum_r |q_c| /
   sum |q_c|) (SparQ's temperature), softmaxed over the held tokens (each token carries its page's
   logit) and summed over the group. The top B // 2 tokens of that score, here the top
   (B // 2) // page pages (at least one), are then attended exactly. The scoring reads r numbers
   of each page (one bound per channel): about B / 2 tokens' K and V, so B splits evenly between
   finding the tokens and reading them.

Defaults: budget 1024 (gpt-fast RocketArgs.token_budget); window_size 32 and kernel_size 63
(infllm_utils.compress, every benchmark but SCBench, whose window is 128); skip_layers 0, the first
layers that keep and read every token (the Llama-3.1 and Mistral configs; LongChat's use 2).

What differs:
- The chunk is the cache's page (`block_size`, 16 by default), whose key bounds the cache keeps
  through writes and compaction. The official chunk is min(floor(c2), ceil(sqrt(c2))), 2 to 4
  tokens at the paper's budgets (TensorRT-LLM's page_size 4), and 1 (SparQ over single keys) when
  c2 < 2; with 16-token pages r reaches D whenever c2 <= 16, so only the sequence is reduced. Give
  the engine block_size=4 for the paper's granularity.
- Whole pages: the official top-k over tokens, whose scores are their chunk's, takes whole chunks
  but the last. A head holding no more pages than it reads reads them all, unscored.
- The split follows the prompt alone: the official code sets c from prompt + max new tokens and
  keeps capacity minus max new of the prompt, so the cache ends at the capacity; here the prompt
  keeps the capacity and generated tokens add to it. c2 and r follow the tokens held each step
  (officially fixed from the capacity).
- SnapKV++'s "adaptive pooling size" is the official code's kernel_size 63 for every length, an
  option here; how the paper adapts it to the sequence length is not reproduced (≈: not re-checked
  against the paper's text).
- A budget at most the window is refused (the official code asserts it), so the window stays whole.
- Scores in float32 (the official code keeps the model's dtype).
- A recompute after preemption runs its generated tokens densely (as prefill).
"""

import math

import torch

from nanokv.methods.base import PageReader, Picks, ReadStep, top_slots
from nanokv.methods.snapkv import SnapKV


class RocketKV(SnapKV, PageReader):
    name = "rocketkv"
    description = ("SnapKV++ eviction at prefill, then per step the top pages of an approximate attention "
                   "(top-r channels of the page key bounds)")
    paper = "https://arxiv.org/abs/2502.14051"
    reads_bounds = True
    options = {
        "window_size": (int, 32, "an integer >= 1", lambda v: v >= 1),
        "kernel_size": (int, 63, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
        "skip_layers": (int, 0, "an integer >= 0", lambda v: v >= 0),
    }
    pooling = "max"
    group_mean_before_pooling = True  # SnapKV++: the group's attention summed, then pooled

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        if compression:
            raise ValueError(f"rocketkv splits a token budget between its two stages: give --budget (tokens read "
                             f"per head and step, e.g. 256), not --compression={compression!r}")
        super().__init__(0.0, budget, **options)

    @property
    def compresses(self) -> bool:
        return True  # stage 1 evicts at prefill (a PageReader alone evicts nothing)

    def check_budget(self):
        if self.budget <= self.window_size:
            raise ValueError(f"budget={self.budget} must exceed window_size={self.window_size} for rocketkv "
                             f"(the prompt keeps its window and more)")

    def applies_to(self, layer: int) -> bool:
        return layer >= self.skip_layers

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        """SnapKV++'s share of the compression: n / c^a tokens (the module docstring)."""
        c = max(1.0, n / self.budget)
        a = min(0.2 + 0.06 * math.log2(c), 0.8)
        return min(n, int(n / c ** a))

    def pick(self, step: ReadStep) -> Picks:
        kmin, kmax = step.bounds                                                # [b, H, P, D]
        b, H, P, D = kmin.shape
        bs, held = step.block_size, step.lengths                                # held [b, H]
        q = step.queries.float().view(b, H, -1, D)                              # [b, H, g, D]
        # head dimension: the r channels where the group's |q| is largest
        r = (D * bs * self.budget / held.clamp(min=self.budget)).round().clamp(1, D).long()
        rank = q.abs().sum(2).argsort(-1, descending=True).argsort(-1)
        q_hat = q * (rank < r[..., None])[:, :, None]
        # sequence: the page's bound on the side of the group's query
        bound = torch.where((q.sum(2) > 0)[:, :, None], kmax, kmin).float()
        logits = torch.einsum("bhgd,bhpd->bhgp", q_hat, bound)
        temperature = (D * q_hat.abs().sum(-1) / q.abs().sum(-1)).sqrt()      # [b, H, g]
        # every token carries its page's logit, so a page weighs in the softmax by its tokens
        tokens = (held[..., None] - bs * torch.arange(P, device=held.device)).clamp(0, bs)
        x = logits / temperature[..., None]
        log_norm = torch.logsumexp(x + tokens.log()[:, :, None], dim=-1, keepdim=True)
        score = (x - log_norm).exp().sum(2).masked_fill(tokens == 0, float("-inf"))
        want = max(1, self.budget // 2 // bs)
        pages_held = (held + bs - 1) // bs
        scored = torch.where(pages_held > want, pages_held * r, 0).sum() * kmin.element_size()
        return Picks(pages=top_slots(score, want), scored_bytes=scored)
