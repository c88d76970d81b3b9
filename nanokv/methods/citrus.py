"""citrus: read the context a chunk at a time, keeping after each chunk what the instruction attends to.

Paper: CItruS: Chunked Instruction-aware State Eviction for Long Sequence Modeling (Bai, Zou, Huang,
Chen, Rondeau, Gao and Cheung, EMNLP 2024), arXiv 2406.12018; code ybai-nlp/CItruS.

Eviction by the context's own attention keeps what helps predict the next word of the document,
not what the task needs ("information neglect"). CItruS reads a long document in chunks (chunked
state eviction) and, after each chunk, lets the instruction (the question) choose: the
instruction's tokens are run over the cache, their attention to each cached state is averaged over
the instruction's tokens and over every attention head of the layer, and the layer keeps its top-k
states (one choice for all of its heads). The instruction's own KV is dropped; once the document
has been read, the instruction is fed for real over what stayed.

In nanokv: `budget` is k, `chunk_size` the chunk (Method.prefill_chunk). After every chunk the
instruction runs as a scoring pass over the layer's cache and the new chunk (base.py:
scoring_passes); each layer keeps the budget tokens it attends to most, the same tokens in every
kv-head. The instruction is the `instruction` option followed by the reply's opening: a method's
scoring pass sees only the compressed part of the prompt, not the question of a (context,
question) prompt (LLM.generate hands scoring_passes the context's ids alone).

Defaults: budget (k) 768 and chunk_size 256 (ybai-nlp/CItruS @ ce93d9d, src/usage_longbench.py's
arguments and README.md); the shared-cache variant, "instruction_aware_single" (README.md's
LongBench command; run_on_longbench.sh runs "instruction_aware_double", and the script's own
default is "standard", the instruction-free chunked eviction).
What differs:
- the instruction is a fixed text (the option), not the request's question, which the scoring
  pass cannot reach (see above); give the question as `instruction` for the paper's setting.
- the official loop keeps each new chunk whole while the next chunk is read, evicting the older
  states down to k by the instruction's attention over them (k + chunk held between chunks), and
  trims to k by the instruction once the document ends. Here each chunk competes at once: after
  every chunk the layer keeps its top k of all it holds, the chunk included (k between chunks;
  the same k at the end).
- the instruction also sees the new chunk when it scores (officially it attends over the cache
  the chunk was read over); its softmax covers the cache and itself, as officially.
- the separate task cache ("instruction_aware_double": a second cache kept for the instruction
  beside the language-modelling one) is not built: nanokv holds one cache per sequence.
- the official code re-numbers the kept states' positions (a position-shift attention, as
  StreamingLLM's); nanokv keeps each key at its original position.
- scores in float32 (the official code averages the model's attention in its dtype).
- compression=r (not in the paper, whose k is fixed) keeps after each chunk the share (1 - r) of the
  context read so far, ending at ceil((1 - r) n) as under any method; with neither budget nor
  compression k is the default 768.
"""

import torch

from nanokv.methods.base import PrefillView
from nanokv.methods.infinipot import ChunkedPass, pass_attention

INSTRUCTION = "\n\nAnswer the question based on the context above."


class CItruS(ChunkedPass):
    name = "citrus"
    description = "chunked prefill; after each chunk keep the top-k tokens by an instruction's attention (all heads)"
    paper = "https://arxiv.org/abs/2406.12018"
    default_budget = 768
    options = {
        "chunk_size": (int, 256, "an integer >= 1 (context tokens read between evictions)", lambda v: v >= 1),
        "instruction": (str, INSTRUCTION, "a non-empty text (the instruction whose attention chooses)",
                        lambda v: bool(v.strip())),
    }

    def pass_text(self) -> str:
        return self.instruction

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S]: the instruction's attention to each held token, averaged over all the layer's
        query heads, the same in every kv-head."""
        H = view.keys.shape[0]
        return view.all_heads(pass_attention(view)).mean(dim=0).expand(H, -1)  # every rank's heads

    def choose(self, view: PrefillView, k: int) -> torch.Tensor:
        H, S = view.keys.shape[:2]
        top = self.scores(view)[0].topk(k).indices
        keep = torch.zeros(S, dtype=torch.bool, device=view.keys.device).scatter_(0, top, True)
        return keep.expand(H, -1).clone()
