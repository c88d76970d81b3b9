"""DuoAttention's head scores: kvpress's training-free on-the-fly approximation (see the package
docstring)."""

from __future__ import annotations

import math

import torch

from nanokv.calibrate.dense import run_dense

Q_LEN = 500  # kvpress's duo_attention_on_the_fly q_len


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] after RoPE with (cos, sin) [T, D] -> before it, float32 (rotation by -angle)."""
    from nanokv.models.rope import apply_rope

    return apply_rope(x.float(), cos, -sin)


def duo_head_scores(q_mean: torch.Tensor, k_mean: torch.Tensor, inv_freq: torch.Tensor, q_len: int = Q_LEN):
    """q_mean [Hq, D], k_mean [H, D] pre-RoPE -> [H]: the mean query and key repeated at positions
    0..q_len-1 with RoPE, the last query's softmax over the keys, the mean of its cumulative sum,
    averaged over each kv-head's query heads (kvpress's duo_attention_on_the_fly)."""
    from nanokv.models.rope import apply_rope, rope_cos_sin

    Hq, D = q_mean.shape
    H = k_mean.shape[0]
    cos, sin = rope_cos_sin(torch.arange(q_len, device=q_mean.device), inv_freq.to(q_mean.device), torch.float32)
    q = apply_rope(q_mean.float().expand(q_len, Hq, D), cos, sin)[-1]                 # [Hq, D] at q_len - 1
    k = apply_rope(k_mean.float().expand(q_len, H, D), cos, sin)                      # [q_len, H, D]
    k = k.repeat_interleave(Hq // H, dim=1)                                           # [q_len, Hq, D]
    weights = (torch.einsum("hd,shd->hs", q, k) / math.sqrt(D)).softmax(dim=-1)      # [Hq, q_len]
    return weights.cumsum(dim=-1).mean(dim=-1).view(H, -1).mean(dim=-1)


def duoattention_scores(model, config, texts: list[list[int]], q_len: int = Q_LEN, progress=None) -> torch.Tensor:
    """[L, H] DuoAttention on-the-fly scores over `texts` (token ids each)."""
    from nanokv.models.rope import rope_cos_sin

    scores = torch.zeros(config.num_layers, config.num_kv_heads, dtype=torch.float64)
    for ids in texts:
        cos, sin = rope_cos_sin(torch.arange(len(ids), device=model.inv_freq.device), model.inv_freq, torch.float32)

        def record(layer, q, k, sliding_window):
            q_mean, k_mean = undo_rope(q, cos, sin).mean(dim=0), undo_rope(k, cos, sin).mean(dim=0)
            scores[layer] += duo_head_scores(q_mean, k_mean, model.inv_freq, q_len).double().cpu() / len(texts)

        run_dense(model, ids, record)
        if progress:
            progress()
    return scores
