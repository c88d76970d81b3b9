"""Rotary position embeddings (RoPE), in the rotate-half layout of Hugging Face checkpoints.

Positions come in as data (one per token), never as "cache length": compression methods
drop and keep tokens, so a token's position must travel with it.
"""

import math

import torch

# rotate-half RoPE itself lives with the kernels' maths, which rotate rebuilt keys with it too
from nanokv.kernels.reference import apply_rope  # noqa: F401


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """The per-pair rotation speeds, float32 [head_dim // 2], after any context scaling. Always
    built on the CPU (also inside a meta-device context); the caller moves it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "freq_factors":  # llama.cpp ships Llama 3.1 scaling pre-computed as divisors
        return inv_freq / torch.as_tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: slow (long-wavelength) pairs are stretched by `factor`, fast ones kept,
    and the band between is blended linearly in 1/wavelength."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin for each position, [T, head_dim], computed in float32 as transformers does."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_cos_sin_gathered(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """rope_cos_sin of many positions [T] that repeat or lie close (every head's copy of a token, a
    reader's picks): each position of their range once, then read per row, where the range is the
    shorter (on a CPU, cos and sin per row took a quarter of a reader's decode step). One host sync,
    to size the range: for the eager paths, not the model's step."""
    if positions.numel() == 0:
        return rope_cos_sin(positions, inv_freq, dtype)
    low, high = (int(p) for p in torch.aminmax(positions))
    if high - low + 1 >= positions.numel():
        return rope_cos_sin(positions, inv_freq, dtype)
    cos, sin = rope_cos_sin(torch.arange(low, high + 1, device=positions.device), inv_freq, dtype)
    return cos.index_select(0, positions - low), sin.index_select(0, positions - low)
