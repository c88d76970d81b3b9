"""infinipot: read the prompt a chunk at a time into a fixed pot, distilled by a catalyst prompt's attention.

Paper: InfiniPot: Infinite Context Processing on Memory-Constrained LLMs (Kim, Shim, Choi and Chang,
EMNLP 2024), arXiv 2410.01518. No official code is public.

Continual Context Distillation (CCD): the context streams into a KV "pot" of fixed capacity M. Each
time the pot is full it is distilled to C < M tokens, and the next M - C tokens stream in over what
stayed. A token's importance is the attention it draws from a Catalyst Prompt (CaP): a short
summarise-style request appended after the pot, whose queries look at the whole pot the way a
later question would (its own KV is dropped). The paper adds Novelty under Compression (NuC): the
token's surprisal (its negative log-likelihood under the distilled context), so hard-to-predict,
new tokens are kept too.

In nanokv: `budget` is C, what the pot keeps after each distillation (and what each (layer, head)
holds once the prompt is read); `chunk_size` is M - C, so a layer holds at most M = budget +
chunk_size while a chunk runs (Method.prefill_chunk). After every chunk the catalyst prompt runs
as a scoring pass over the pot and the chunk (base.py: scoring_passes), and each layer keeps, per
kv-head, the budget tokens its query group's catalyst queries attend to most (mean over the
catalyst's tokens and the group's heads, softmax over the pot and the catalyst itself, causal).

Defaults: chunk_size=2048, budget=2048 (a pot of M = 4096 distilled by half) (≈: the paper's main
setting is a 4K pot on 4K-context models; its exact C and the catalyst text are not re-checked:
no official code); catalyst "Summarize the previous context." followed by the reply's opening (≈).
What differs:
- NuC is not built: it is the surprisal of each token, read from the model's logits, which a
  method never sees (a method sees attention queries and keys only). CaP alone picks.
- Context-Reset RoPE (CR-RoPE: the kept tokens re-numbered 0..C-1 and the next chunk placed right
  after them) is not built: nanokv keeps each key at its original position (re-assigning would
  re-rotate every stored key); generation goes on at the position after the prompt.
- the pot is distilled after every chunk whose layer holds more than the budget, the last
  (partial) chunk included, so the prompt always ends at `budget` tokens a head; the paper
  distills when the pot is full.
- the catalyst's attention is averaged, not pooled (≈: whether the paper pools it SnapKV-style is
  not re-checked), in float32.
- compression=r (not in the paper, whose pot is fixed) keeps after each chunk the share (1 - r) of
  the prompt read so far: a pot growing with the prompt, ending at ceil((1 - r) n) as under any
  method. With neither budget nor compression the pot is the default budget.
"""

import math

import torch

from nanokv.methods.base import PrefillSelector, PrefillView, top_per_head

CATALYST = "\n\nSummarize the previous context."


def pass_attention(view: PrefillView) -> torch.Tensor:
    """[Hq, S] float32: each held token's attention from the view's scoring pass (one pass of m
    tokens), averaged over the pass's queries. Each query's softmax runs over every held key and
    the pass's own keys up to itself, as the model's attention did (the pass follows the prompt)."""
    H, S, D = view.keys.shape
    q = view.scoring_queries.float()                                          # [m, Hq, D]
    m, Hq = q.shape[:2]
    keys = torch.cat([view.keys.float(), view.scoring_keys.float()], dim=1)   # [H, S + m, D]
    keys = keys.repeat_interleave(Hq // H, dim=0)                             # [Hq, S + m, D]
    logits = torch.einsum("mhd,hkd->hmk", q, keys) / math.sqrt(D)             # [Hq, m, S + m]
    own = torch.arange(m, device=q.device)
    logits[:, :, S:] = logits[:, :, S:].masked_fill(own[None, :] > own[:, None], float("-inf"))
    return logits.softmax(dim=-1)[:, :, :S].mean(dim=1)


class ChunkedPass(PrefillSelector):
    """A prompt read `chunk_size` tokens at a time (Method.prefill_chunk), each chunk followed by one
    scoring pass (the text `pass_text` and the reply's opening) whose attention picks what each
    layer keeps of all it holds (`choose`). `budget`: the tokens each head keeps after every chunk;
    compression=r: the share (1 - r) of the prompt read so far, so the prompt ends at ceil((1 - r) n)
    as under any method; neither: `default_budget`."""
    default_budget = 1024
    chunk_size = 1024

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, self.default_budget if budget is None and not compression else budget, **options)
        self.prefill_chunk = self.chunk_size  # the runner reads the prompt this many tokens at a time

    def pass_text(self) -> str:
        raise NotImplementedError

    def choose(self, view: PrefillView, k: int) -> torch.Tensor:
        """[H, S] bool: the k tokens each head keeps."""
        raise NotImplementedError

    def scoring_passes(self, prompt_ids: list[int], encode, reply_prefix: str) -> list[list[int]]:
        if self.tokens_to_keep(len(prompt_ids)) >= len(prompt_ids):  # nothing is ever dropped
            return []
        return [encode(self.pass_text()) + encode(reply_prefix)]

    def pot(self, view: PrefillView) -> int:
        """Tokens each head keeps after this chunk. Under compression the prompt read so far ends at
        the newest position (every key keeps its own): read once a chunk, for all its layers."""
        if self.budget is not None:
            return self.budget
        read = view.sequence_state.setdefault("read", int(view.positions.max()) + 1)
        return self.tokens_to_keep(read)

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        S = view.keys.shape[1]
        if view.scoring_queries is None:  # the prompt is within budget: no pass was fed
            return None
        k = self.pot(view)
        return None if S <= k else self.choose(view, k)


class InfiniPot(ChunkedPass):
    name = "infinipot"
    description = "chunked prefill into a fixed pot, distilled after each chunk by a catalyst prompt's attention"
    paper = "https://arxiv.org/abs/2410.01518"
    default_budget = 2048
    options = {
        "chunk_size": (int, 2048, "an integer >= 1 (new tokens read between distillations)", lambda v: v >= 1),
        "catalyst": (str, CATALYST, "a non-empty text (the catalyst prompt)", lambda v: bool(v.strip())),
    }

    def pass_text(self) -> str:
        return self.catalyst

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S]: the catalyst's attention to each held token, averaged over each kv-head's group."""
        H, S = view.keys.shape[:2]
        return pass_attention(view).view(H, -1, S).mean(dim=1)

    def choose(self, view: PrefillView, k: int) -> torch.Tensor:
        return top_per_head(self.scores(view), k)
