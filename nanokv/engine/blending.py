"""The two forward passes of a blending method's prefill (CacheBlend: nanokv/methods/cacheblend.py),
as the model's attention callables (nanokv/models/llama.py), for one sequence's context.

ChunksAlone: every token of the context, each chunk attending only over itself (the KV a store of
precomputed chunks would hold, at the chunks' final positions), written to the sequence's cache in
order, so slot j of every layer holds position j.

Blend: the context again, over that cache. Before the method's check layer every token is
recomputed; at it, the method picks the tokens to recompute from how far each one's new K/V lies
from its chunk-alone K/V, and only those go on (`narrow`). At each layer the tokens computed there
overwrite their own slots with their new K/V (cache/overwrite.py) and attend over the blended cache:
chunk-alone K/V for the others, recomputed K/V for them.
"""

from __future__ import annotations

import torch

from nanokv.cache.overwrite import read_tokens, write_tokens
from nanokv.kernels.reference import attention_by_position


class ChunksAlone:
    def __init__(self, cache, seq_id: int, chunk_lengths: list[int], positions: torch.Tensor):
        self.cache, self.seq_id, self.chunk_lengths, self.positions = cache, seq_id, chunk_lengths, positions
        self.prefill_flops = 0  # as StepAttention's: 4 D per (query, key) pair per query head

    def __call__(self, layer, q, k, v, sliding_window):
        self.cache.write_prefill(self.seq_id, layer, k, v, self.positions)
        self.prefill_flops += 4 * q.shape[-1] * q.shape[1] * sum(n * (n + 1) // 2 for n in self.chunk_lengths)
        out = attention_within(self.cache.kernels, q, k, v, self.chunk_lengths, sliding_window)
        self.cache.settle(self.seq_id, layers=slice(layer, layer + 1))
        return out


def attention_within(kernels, q, k, v, sizes: list[int], sliding_window) -> torch.Tensor:
    """Causal attention of each run of `sizes` rows over itself alone, in row order (a chunk of
    consecutive positions, or HOMER's merged chunks, whose positions repeat) -> [T, Hq, D]."""
    fresh = kernels.fresh_prefill  # a prompt over its own K/V alone (GPU: SDPA)
    outs = []
    for q_c, k_c, v_c in zip(q.split(sizes), k.split(sizes), v.split(sizes)):
        rows = torch.arange(len(q_c), device=q.device)
        outs.append(fresh(q_c, k_c, v_c) if fresh is not None and sliding_window is None
                    else attention_by_position(q_c, k_c, v_c, rows, rows, sliding_window))
    return torch.cat(outs)


class Blend:
    def __init__(self, cache, seq_id: int, n: int, method):
        self.cache, self.seq_id, self.method = cache, seq_id, method
        self.rows = torch.arange(n, device=cache.pool.device)  # the context tokens this layer computes
        self.picked: torch.Tensor | None = None  # at the check layer: which of them go on
        self.recomputed = []  # how many tokens each layer recomputed (what tests read)
        self.prefill_flops = 0  # as StepAttention's: each recomputed query over the n context keys at most
        self.n = n

    def __call__(self, layer, q, k, v, sliding_window):
        cache, rows = self.cache, self.rows
        new_k, new_v = k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
        out = torch.zeros_like(q)  # rows that stop here (at the check layer) leave with zeros
        computed = slice(None)
        if layer == self.method.check_layer:
            cached = read_tokens(cache, self.seq_id, layer, rows, ("k", "v"))  # [H, T, D] chunk-alone
            self.picked = self.method.recompute({"k": new_k, "v": new_v}, cached).nonzero().flatten()
            computed, rows = self.picked, rows[self.picked]
            self.rows = rows
        write_tokens(cache, self.seq_id, layer, rows, {"k": new_k[:, computed], "v": new_v[:, computed]})
        out[computed] = cache.attend_prefill(self.seq_id, layer, q[computed], rows, sliding_window)[0]
        self.recomputed.append(len(rows))
        T = len(rows)
        pairs = T * (T + 1) // 2 if T == self.n else T * self.n
        self.prefill_flops += 4 * q.shape[-1] * q.shape[1] * pairs
        return out

    def narrow(self, layer):
        """After the check layer, only the picked tokens go on."""
        picked, self.picked = self.picked, None
        return picked
