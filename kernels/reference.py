"""Plain-torch reference attention: the maths every kernel in this folder must reproduce.

Masks are built from positions, not from slot indices: after a compression method has
dropped tokens, slot i no longer sits at position i, but "key position <= query position"
and "query position - key position < window" stay true statements about the tokens.

Scores, softmax and the weighted sum run in float32 whatever the storage dtype. (This is
also why this is not torch's scaled_dot_product_attention: on CPU its bfloat16 path takes
~50 ms a call for some key lengths, a thousand times its usual cost.)
"""

import math

import torch


def attention_by_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_pos: torch.Tensor, k_pos: torch.Tensor,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of one sequence, GQA allowed.

    q: [T, Hq, D]; k, v: [S, Hkv, D]; q_pos: [T]; k_pos: [S] -> [T, Hq, D].
    A query sees a key when k_pos <= q_pos and, with a window W, q_pos - k_pos < W.
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    group = Hq // Hkv  # query heads sharing one kv-head (GQA)
    qf = q.float().view(T, Hkv, group, D).permute(1, 2, 0, 3)         # [Hkv, group, T, D]
    kf = k.float().permute(1, 2, 0).unsqueeze(1)                      # [Hkv, 1, D, S]
    vf = v.float().transpose(0, 1).unsqueeze(1)                       # [Hkv, 1, S, D]
    scores = (qf @ kf) * (1.0 / math.sqrt(D))                         # [Hkv, group, T, S]
    allowed = k_pos[None, :] <= q_pos[:, None]                        # [T, S]
    if sliding_window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(dim=-1) @ vf                                 # [Hkv, group, T, D]
    return out.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


def paged_attention(q: torch.Tensor, q_pos: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    pos_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Attention of B sequences' queries over their paged, per-head KV.

    q: [B, T, Hq, D] and q_pos: [B, T] (decode: T = 1; prefill: one sequence, B = 1);
    k_pool, v_pool: [num_blocks, block_size, D]; pos_pool: [num_blocks, block_size];
    tables: [B, Hkv, nb] block ids (entries past a head's blocks are ignored, may be -1);
    lengths: [B, Hkv] tokens held per head. Heads may hold different numbers of tokens.
    -> [B, T, Hq, D]. Same masking rule as `attention_by_position`.
    """
    B, T, Hq, D = q.shape
    Hkv = tables.shape[1]
    group = Hq // Hkv
    tables = tables.clamp(min=0)
    k = k_pool[tables].flatten(2, 3).float()                           # [B, Hkv, S, D]
    v = v_pool[tables].flatten(2, 3).float()
    k_pos = pos_pool[tables].flatten(2)                                # [B, Hkv, S]
    S = k.shape[2]
    held = torch.arange(S, device=q.device) < lengths[..., None]                         # [B, Hkv, S]
    # Slots past a head's length are never written: they may hold NaN, and 0 * NaN is NaN.
    v.masked_fill_(~held[..., None], 0)
    allowed = held[:, :, None, :] & (k_pos[:, :, None, :] <= q_pos[:, None, :, None])    # [B, Hkv, T, S]
    if sliding_window is not None:
        allowed = allowed & ((q_pos[:, None, :, None] - k_pos[:, :, None, :]) < sliding_window)
    qf = q.float().view(B, T, Hkv, group, D).permute(0, 2, 3, 1, 4)   # [B, Hkv, group, T, D]
    scores = (qf @ k[:, :, None].transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [B, Hkv, group, T, S]
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    out = scores.softmax(dim=-1) @ v[:, :, None]                       # [B, Hkv, group, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)
