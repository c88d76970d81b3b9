"""tidaldecode: pick the tokens once at a selection layer, and let the layers after it reuse them.

Paper: TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention (Yang,
Zhang, Chen, Li, Jia; ICLR 2025), arXiv 2410.05076. Tokens that one layer attends to most are
mostly the ones the next layers attend to most ("position persistence"), so choosing them anew
in every layer (Quest) is wasted work. Each decode step:

    layers 0 .. skip_layers - 1   full attention
    layer skip_layers             full attention; its top `budget` tokens per head are kept
    later layers                  attend only to those token positions
    layer correction_layer        full attention again, and a new top `budget` for the layers after it

The cache is kept whole; prefill is dense. Token-level picks: the engine gathers the picked
slots into blocks of their own (cache.attend_slots).

Defaults from the official code (DerrickYLJ/TidalDecode @ d67a1bd): skip_layers=2
(`sparse_layer_start`, src/tidal_build/modify_llama.py), correction layer 13 for Llama-3-8B's 32
layers (examples/run_tidal_llama.sh, experiments/LongBench/run_longbench.sh; the paper's
"TD+L13"; 0-based, as layer_idx there, while the kernel path's tidal/models/llama.py puts its
second selection at index 12), a budget of 256 tokens when none is given (src/enable_tidal.py's top_k; the paper
runs 128 to 4096). The paper picks the correction layer per model; for a model that is not 32
layers deep `correction_layer=-1` (the default) takes the same share of the depth, round(13 L /
32) (our scaling: 12 of SmolLM2's 30, 10 of Qwen2.5-0.5B's 24), and re-selects nowhere when that
falls on or before the selection layer.

What differs:
- GQA: the official accuracy path (modify_llama.py) repeats the kv-heads and takes each query
  head's own top-k of its logits, so a kv-head may serve up to group x k tokens. The cache
  stores kv-heads and the budget is per kv-head, so here a kv-head keeps the k tokens with the
  highest attention probability of any of its query heads (the max over the group of each
  head's softmax: with one query per kv-head, exactly the official per-head top-k). The
  official kernel path (tidal/models/SearchAttention.py) has no GQA (README: "Llama3 Model
  Support + GQA" open).
- Its kernel path always reads the newest page besides the top-k; the accuracy path, as here,
  ranks the newest token like any other.
- Bytes: a selection layer reads every page once (K and V): the official SearchAttention takes
  its top-k from the q.k products its own attention pass writes out (decode_sparse_attn(...,
  output_qk_product=True)), so the scoring reads nothing more. This file scores step.keys
  apart, which a fused kernel would not.
- The paper's optional KV cache correction (re-prefilling sparsely decoded tokens densely) is not
  done. A recompute after preemption runs its generated tokens densely (as prefill).
"""

import torch

from nanokv.methods.base import PageReader, Picks, ReadStep, top_slots

PAPER_LAYERS, PAPER_CORRECTION = 32, 13  # Llama-3-8B: re-select at layer 13 of 32


class TidalDecode(PageReader):
    name = "tidaldecode"
    description = ("query-aware sparse decode: full attention picks the top tokens at a selection layer, "
                   "the layers after it reuse them (cache kept whole)")
    paper = "https://arxiv.org/abs/2410.05076"
    default_budget = 256
    options = {
        "skip_layers": (int, 2, "an integer >= 0 (the dense layers; the next one selects)", lambda v: v >= 0),
        "correction_layer": (int, -1, "an integer after skip_layers, or -1 (13 of 32 layers, scaled to the "
                             "model's depth)", lambda v: v >= -1),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        if self.correction_layer != -1 and self.correction_layer <= self.skip_layers:
            raise ValueError(f"option correction_layer={self.correction_layer} of method 'tidaldecode' must be after "
                             f"the selection layer skip_layers={self.skip_layers} (or -1: 13 of 32 layers, scaled)")

    def correction(self, num_layers: int) -> int | None:
        """The layer that re-selects, or None."""
        if self.correction_layer != -1:
            if self.correction_layer >= num_layers:
                raise ValueError(f"option correction_layer={self.correction_layer} of method 'tidaldecode' must be "
                                 f"in {self.skip_layers + 1} .. {num_layers - 1} for this {num_layers}-layer model")
            return self.correction_layer
        layer = round(PAPER_CORRECTION * num_layers / PAPER_LAYERS)
        return layer if self.skip_layers < layer < num_layers else None

    def pick(self, step: ReadStep) -> Picks:
        if step.layer not in (self.skip_layers, self.correction(step.num_layers)):
            return Picks(slots=step.step_state["slots"])  # the same tokens: slot j holds one token at every layer
        held = step.held()
        probs = step.logits().softmax(dim=-1).amax(dim=2)  # any query head of the group that attends to it
        step.step_state["slots"] = top_slots(probs.masked_fill(~held, float("-inf")), self.budget)
        pages = torch.arange(held.shape[-1] // step.block_size, device=held.device)
        pages = pages.expand(*held.shape[:2], -1)
        return Picks(pages=pages.masked_fill(pages * step.block_size >= step.lengths[..., None], -1))
