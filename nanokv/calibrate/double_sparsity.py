"""Double Sparsity's outlier channels (Post-Training Sparse Attention with Double Sparsity,
arXiv 2408.07092; nanokv/methods/double_sparsity.py): per layer and head, how much each channel
of the query and key weighs, over calibration text.

The model runs over the text with a dense attention of its own (calibrate/dense.py) that hands
each layer's post-RoPE queries and keys to a recorder. As the official offline calibration
(andy-yang-1/DoubleSparse config/offline_calibration.py) it keeps, per channel, the mean over
tokens of
    qk: |q_c k_c|, each token's query with its own key after RoPE (the key repeated over its
        group's query heads), per query head (the official default, --channel qk);
    q:  |q_c| before RoPE, per query head;
    k:  |k_c| before RoPE, per kv-head.
The official code sums each block's mean over 256 Pile-validation samples cut into blocks of 512
tokens; with blocks of equal length that is the mean's order. The method ranks the channels.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import run_dense


@torch.inference_mode()
def channel_magnitudes(model, config, texts: list[list[int]], progress=None) -> dict[str, torch.Tensor]:
    """-> {qk_channels [L, Hq, D], q_channels [L, Hq, D], k_channels [L, H, D]}: the mean magnitudes
    above (float32)."""
    from nanokv.calibrate.duoattention import undo_rope
    from nanokv.models.rope import rope_cos_sin

    L, Hq, H, D = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
    device = model.inv_freq.device
    sums = {"qk": torch.zeros(L, Hq, D, dtype=torch.float64, device=device),
            "q": torch.zeros(L, Hq, D, dtype=torch.float64, device=device),
            "k": torch.zeros(L, H, D, dtype=torch.float64, device=device)}
    tokens, angles = 0, None

    def record(layer, q, k, sliding_window):
        q, k = q.float(), k.float()
        sums["qk"][layer] += (q * k.repeat_interleave(Hq // H, dim=1)).abs().sum(0)
        sums["q"][layer] += undo_rope(q, *angles).abs().sum(0)
        sums["k"][layer] += undo_rope(k, *angles).abs().sum(0)

    for ids in texts:
        angles = rope_cos_sin(torch.arange(len(ids), device=device), model.inv_freq, torch.float32)
        run_dense(model, ids, record)
        tokens += len(ids)
        if progress:
            progress()
    return {f"{kind}_channels": (s / tokens).float().cpu().contiguous() for kind, s in sums.items()}
