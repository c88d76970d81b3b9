"""The bases ECKVH stores tokens in (Effectively Compress KV Heads for LLM, arXiv 2406.07056;
nanokv/methods/eckvh.py): per layer and group of adjacent kv-heads, the right singular vectors
of the group's keys and values over calibration text.

For a group of g kv-heads, stack the calibration tokens' pre-RoPE keys of its heads (each less
the projection's bias, zero for Llama) into K_g [N, g * D]; K_g = U S Psi^T, and the first r
columns of Psi span the r-dimensional subspace that keeps the most of ||K_g||^2 (Eckart-Young):
the paper's compressed heads. Psi is also the eigenvector matrix of K_g^T K_g, with S^2 its
eigenvalues, so the g*D x g*D Gram matrix summed over the texts gives it without holding the
N x g*D activations (nanokv/calibrate/lowrank.py `whitened_bases`: the same sums serve Palu,
whose whitened SVD of the weights has these left singular vectors). The same for values.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.lowrank import whitened_bases


@torch.inference_mode()
def activation_bases(model, config, texts: list[list[int]], group: int, progress=None) -> dict[str, torch.Tensor]:
    """Per layer and group, Psi of the pre-RoPE keys and of the values over `texts` (columns by
    descending singular value), their singular values and the biases -> {k_basis, v_basis
    [L, G, gD, gD], k_spectrum, v_spectrum [L, G, gD], k_bias, v_bias [L, G, gD]}."""
    return whitened_bases(model, config, texts, group, progress)
