"""Plain-torch reference attention: the maths every kernel in this folder must reproduce.

Masks are built from positions, not from slot indices: after a compression method has
dropped tokens, slot i no longer sits at position i, but "key position <= query position"
and "query position - key position < window" stay true statements about the tokens.
"""

import torch
import torch.nn.functional as F


def attention_by_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_pos: torch.Tensor, k_pos: torch.Tensor,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of one sequence, GQA allowed.

    q: [T, Hq, D]; k, v: [S, Hkv, D]; q_pos: [T]; k_pos: [S] -> [T, Hq, D].
    A query sees a key when k_pos <= q_pos and, with a window W, q_pos - k_pos < W.
    """
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    if bool(allowed.all()):
        allowed = None  # e.g. one decode token over its whole past: no mask needed
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)
