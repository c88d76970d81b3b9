"""kvzip: score every cached token by how much the model needs it to repeat the context.

Paper: KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction (Kim et al.,
2025), arXiv 2505.23416. After the prompt is cached, the model is asked to repeat it: the
request "Repeat the previous context exactly." (and the reply's opening) followed by the prompt
itself is fed over the cache. A cached token's score at a layer and kv-head is the most
attention any of those reconstruction queries (of the head's query group) gives it: what the
model reads to rebuild the context is what any later question may need. The lowest-scoring
tokens are dropped in one top-k over all layers and heads (uneven layer and head budgets),
the first `sink_tokens` always kept; `layerwise` keeps the same share in every layer instead,
spread unevenly over its heads. The reconstruction's own KV is dropped, and the next token is
read from the prompt's end.

Long prompts are repeated in chunks of `chunk_size` tokens, one pass each; every chunk after
the first is asked for as "Repeat the part of the previous context exactly, starting with" its
previous chunk's last 8 tokens. A chunk's score is its pass's softmax over the sinks, the chunk
and the pass itself (the rest of the prompt left out of the normalization, as in the official
code).

`compression=r` keeps what kvpress keeps: of the N (layer, kv-head, token) pairs, N - int(N r)
stay (layer-wise, H S - int(H S r) a layer), exact at any prompt length; `budget=B` keeps B
tokens a head on average.

Defaults: chunk_size=2048, sink_tokens=4, global top-k (kvpress KVzipPress @ 8bb29b9, whose
kept sets these equal; official code snu-mllab/KVzip @ 5d84729).
What differs:
- with a chat template the whole prompt, template included, is repeated (kvpress repeats only
  the context after the template's opening and its template prefix scores 0).
- the sinks are the first 4 tokens, counted in the budget (kvpress); the official code keeps the
  whole system-prompt prefix unscored and outside the ratio.
- chunk_size 2048 and the later request without a trailing space (kvpress); the official
  self_task uses 2000 and "... starting with " (a space).
- the official code keeps the pairs scoring strictly above a threshold score (score.py
  _threshold: ties dropped, about one pair off); here and in kvpress an exact top-k.
- scores in float32 (kvpress and the official code softmax in the model's dtype: ties only).
- KVzip+'s normalization (by the hidden state's norm and the output projection) and the
  head-level (context-independent) variant are not built.
"""

import math

import torch

from nanokv.methods.base import PrefillSelector, PrefillView, top_over_heads

FIRST_REQUEST = "\n\nRepeat the previous context exactly."
LATER_REQUEST = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk quoted in a later chunk's request
ROW_BYTES = 1 << 26  # the reconstruction's attention is scored a block of queries at a time


class KVzip(PrefillSelector):
    name = "kvzip"
    description = "context reconstruction pass: each token scored by its max attention while the model repeats the prompt"
    paper = "https://arxiv.org/abs/2505.23416"
    options = {
        "chunk_size": (int, 2048, "an integer >= 16", lambda v: v >= 16),
        "sink_tokens": (int, 4, "an integer >= 1", lambda v: v >= 1),
        "layerwise": (bool, False, "true or false", lambda v: True),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the global top-k needs every layer's scores: layers stay whole until the last one
        self.trims_earlier_layers = not self.layerwise

    def check_budget(self):
        if self.budget is not None and self.budget <= self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed sink_tokens={self.sink_tokens} for kvzip")

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        if self.compresses and self.layerwise:
            return self.tokens_to_keep(n)
        return n  # the global top-k trims every layer once the last has been scored

    def kept_pairs(self, pairs: int, n: int) -> int:
        """Of `pairs` (token, kv-head) pairs over an n-token prompt, how many stay: kvpress's
        pairs - int(pairs x compression) (exact at any length), or the budget's share."""
        if self.budget is not None:
            return pairs // n * self.tokens_to_keep(n)
        return pairs - int(pairs * self.compression)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return [(start, min(n, start + self.chunk_size)) for start in range(0, n, self.chunk_size)]

    def scoring_passes(self, prompt_ids: list[int], encode, reply_prefix: str) -> list[list[int]]:
        if self.tokens_to_keep(len(prompt_ids)) >= len(prompt_ids):
            return []
        first, later, reply = encode(FIRST_REQUEST), encode(LATER_REQUEST), encode(reply_prefix)
        return [(first if start == 0 else later + prompt_ids[start - OVERLAP:start]) + reply + prompt_ids[start:end]
                for start, end in self.chunks(len(prompt_ids))]

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S]: each cached token's largest attention from the reconstruction queries of its
        chunk, over the query heads of its group."""
        H, S, D = view.keys.shape
        queries, own_keys = view.scoring_queries.float(), view.scoring_keys.float()
        group = queries.shape[1] // H
        device = view.keys.device
        scores = torch.zeros(H, S, device=device)
        offset = 0  # where this chunk's reconstruction starts in the scoring pass
        for (start, end), m in zip(self.chunks(S), view.scoring_lengths):
            q = queries[offset:offset + m]                                         # [m, Hq, D]
            sinks = min(self.sink_tokens, start)
            keys = torch.cat([view.keys[:, :sinks].float(), view.keys[:, start:end].float(),
                              own_keys[:, offset:offset + m]], dim=1)               # [H, K, D]
            keys = keys.repeat_interleave(group, dim=0)
            best = torch.zeros(H * group, end - start, device=device)
            rows = max(1, ROW_BYTES // (4 * keys.shape[0] * keys.shape[1]))
            for r in range(0, m, rows):  # a block of queries at a time: logits [Hq, rows, K]
                logits = torch.einsum("mhd,hkd->hmk", q[r:r + rows], keys) / math.sqrt(D)
                future = torch.arange(m, device=device)[None, :] > torch.arange(r, min(m, r + rows), device=device)[:, None]
                logits[:, :, -m:] = logits[:, :, -m:].masked_fill(future, float("-inf"))
                probs = logits.softmax(dim=-1)[:, :, sinks:sinks + end - start]   # [Hq, rows, chunk]
                best = torch.maximum(best, probs.amax(dim=1))
            scores[:, start:end] = best.view(H, group, -1).amax(dim=1)
            offset += m
        return scores

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        H, S = view.keys.shape[:2]
        if view.scoring_queries is None:  # the prompt is within budget: no scoring pass was fed
            return None
        scores = self.scores(view)
        scores[:, :self.sink_tokens] = float("inf")
        # its top-k ranks every head of the layer (or of the model): under tensor parallelism each
        # rank gathers every rank's scores (PrefillView.all_heads), selects, and keeps its own heads'
        scores = view.all_heads(scores)
        H = len(scores)
        if self.layerwise:
            return view.own_heads(top_over_heads(scores, self.kept_pairs(H * S, S)))
        state = view.sequence_state.setdefault("kvzip", {"scores": {}})
        state["scores"][view.layer] = scores
        if view.layer < view.num_layers - 1:
            return None  # held whole until every layer is scored
        # one top-k over every layer's scores sets each layer's share
        layers = sorted(state["scores"])
        stacked = torch.stack([state["scores"][layer] for layer in layers])       # [L, H, S]
        kept = stacked.flatten().topk(self.kept_pairs(len(layers) * H * S, S)).indices
        shares = torch.bincount(kept // (H * S), minlength=len(layers)).tolist()
        state["masks"] = {layer: view.own_heads(top_over_heads(stacked[i], k))
                          for i, (layer, k) in enumerate(zip(layers, shares))}
        return state["masks"].pop(view.layer)

    def earlier_keep_masks(self, view: PrefillView) -> dict[int, torch.Tensor]:
        return view.sequence_state.get("kvzip", {}).pop("masks", {})
