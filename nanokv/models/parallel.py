"""One rank's slice of each weight, for tensor parallelism (nanokv/distributed.py).

Heads are split across ranks as in Megatron, vLLM and nano-vllm, in contiguous runs: rank r holds
query heads r * Hq/tp .. and kv-heads r * H/tp .. (so each query head's kv-head stays on its rank),
and rows r * I/tp .. of the MLP's intermediate width.

    column-parallel (a slice of the output rows):  q_proj, k_proj, v_proj (weights and Qwen2's
                    biases, by head), gate_proj, up_proj (by intermediate row)
    row-parallel (a slice of the input columns):   o_proj (by head), down_proj (by intermediate
                    column); their outputs are partial sums, which the model all-reduces
    whole on every rank:                           the embedding, the norms (Qwen3's q_norm and
                    k_norm are per head_dim, the same for every head), lm_head

Weights arrive as Hugging Face named tensors from any loader (safetensors, GGUF, dummy), whole;
`shard_weights` narrows each one as it passes, so `LlamaModel.load_weights` (built from the rank's
config) fills its smaller parameters unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from nanokv.distributed import rank_slice

# Hugging Face projection -> the dimension it is split along: output rows (column-parallel) or input
# columns (row-parallel)
SPLITS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def shard_weights(tensors: Iterable[tuple[str, torch.Tensor]], rank: int,
                  size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the whole model -> the same names with rank `rank` of `size`'s slice of
    each split projection (views, no copies)."""
    for name, tensor in tensors:
        parts = name.rsplit(".", 2)
        dim = SPLITS.get(parts[-2]) if size > 1 and len(parts) == 3 else None
        if dim is not None:
            dim = min(dim, tensor.dim() - 1)  # a bias (q/k/v's) is split along its only dimension
            tensor = rank_slice(tensor, dim, rank, size)
        yield name, tensor
