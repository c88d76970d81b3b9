"""The bases LoRC and Palu store tokens in (nanokv/cache/latent_cache.py), per layer and head group.

For each layer and each group of `group` consecutive kv-heads, an orthonormal basis of the
group's pre-RoPE keys (and one of its values), its columns ordered by importance, with the
spectrum that orders them; a method keeps the first r columns of each.

- lorc, data-free (LoRC, arXiv 2410.03111): the SVD of the weights. W_k,g [group * D, hidden],
  the rows of the key projection for the group's heads, is U S V^T; the basis is U, the spectrum
  S. A key is W_k,g x + b, and U_r U_r^T (k - b) is exactly what the truncated weight
  U_r S_r V_r^T gives. Also each layer's condition number S_max / S_min of its whole W_k and W_v,
  which LoRC's progressive ranks read.
- palu, calibrated (Palu, arXiv 2407.21118, official code shadowpa0327/Palu): the SVD of the
  whitened weight W_k,g S, S S^T = X^T X over the layer's inputs X on calibration text (SVD-LLM).
  Its left singular vectors are the eigenvectors of W S S^T W^T = sum over tokens of
  (k - b)(k - b)^T, and its squared singular values their eigenvalues: so the basis comes from the
  keys' second moments, with no Cholesky of X^T X (which Palu has to regularize). Keys are read
  before RoPE (undone here, as the model hands attention rotated keys), so this also serves
  models whose keys are normalized (qk_norm), where the weight alone does not say what the key is.
  Also Palu's Fisher information of each layer's W_k and W_v (`fisher_information`), which its
  rank search reads.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import DenseAttention


def projection_rows(model, config, layer: int):
    """Layer `layer`'s key and value projection weights [kv_size, hidden] and biases [kv_size]
    (zeros when the model has none), float32: the k and v shards of the packed qkv_proj."""
    attn = model.layers[layer].self_attn
    weight = attn.qkv_proj.weight.detach().float()
    bias = attn.qkv_proj.bias
    bias = torch.zeros(weight.shape[0], device=weight.device) if bias is None else bias.detach().float()
    rows = [config.q_size, config.q_size + config.kv_size, config.q_size + 2 * config.kv_size]
    return weight[rows[0]:rows[1]], weight[rows[1]:rows[2]], bias[rows[0]:rows[1]], bias[rows[1]:rows[2]]


def weight_bases(model, config, group: int) -> dict[str, torch.Tensor]:
    """lorc: per layer and group, the left singular vectors and singular values of W_k,g and W_v,g,
    the biases, and each layer's condition numbers. -> {k_basis, v_basis [L, G, gD, gD],
    k_spectrum, v_spectrum [L, G, gD], k_bias, v_bias [L, G, gD], k_condition, v_condition [L]}."""
    if config.qk_norm:
        raise ValueError("lorc factors W_k, but this model normalizes its keys after the projection (qk_norm); "
                         "use palu, which reads the keys themselves")
    out = {name: [] for name in ("k_basis", "v_basis", "k_spectrum", "v_spectrum", "k_bias", "v_bias",
                                 "k_condition", "v_condition")}
    G = config.num_kv_heads // group
    for layer in range(config.num_layers):
        w_k, w_v, b_k, b_v = projection_rows(model, config, layer)
        for kind, w, b in (("k", w_k, b_k), ("v", w_v, b_v)):
            u, s, _ = torch.linalg.svd(w.double().view(G, -1, w.shape[-1]), full_matrices=False)
            out[f"{kind}_basis"].append(u.float())
            out[f"{kind}_spectrum"].append(s.float())
            out[f"{kind}_bias"].append(b.view(G, -1))
            whole = torch.linalg.svdvals(w.double())
            out[f"{kind}_condition"].append(whole[0] / whole[-1])
    return {name: torch.stack(values).float().cpu() for name, values in out.items()}


class MomentAttention(DenseAttention):
    """DenseAttention that also sums, per layer and group, the outer products of the tokens'
    pre-RoPE keys and values (each less the projection's bias)."""

    def __init__(self, positions, inv_freq, biases, group: int, moments: dict):
        super().__init__(positions)
        self.inv_freq, self.biases, self.group, self.moments = inv_freq, biases, group, moments

    def __call__(self, layer, q, k, v, sliding_window):
        from nanokv.models.rope import rope_cos_sin
        from nanokv.calibrate.duoattention import undo_rope

        cos, sin = rope_cos_sin(self.positions, self.inv_freq, torch.float32)
        T, G = len(k), k.shape[1] // self.group
        b_k, b_v = self.biases[layer]
        for kind, x, b in (("k", undo_rope(k, cos, sin), b_k), ("v", v.float(), b_v)):
            x = (x.reshape(T, -1) - b).view(T, G, -1).double()
            self.moments[kind][layer] += torch.einsum("tgd,tge->gde", x, x)
        return super().__call__(layer, q, k, v, sliding_window)


@torch.inference_mode()
def whitened_bases(model, config, texts: list[list[int]], group: int, progress=None) -> dict[str, torch.Tensor]:
    """palu: per layer and group, the eigenvectors (descending) and eigenvalues of the keys' and
    values' second moments over `texts`, and the biases -> {k_basis, v_basis [L, G, gD, gD],
    k_spectrum, v_spectrum [L, G, gD] (singular values: the eigenvalues' square roots), k_bias,
    v_bias [L, G, gD]}."""
    L, G = config.num_layers, config.num_kv_heads // group
    gd = group * config.head_dim
    device = model.inv_freq.device
    biases = [projection_rows(model, config, layer)[2:] for layer in range(L)]
    moments = {kind: torch.zeros(L, G, gd, gd, dtype=torch.float64, device=device) for kind in "kv"}
    for ids in texts:
        positions = torch.arange(len(ids), device=device)
        model(torch.tensor(ids, device=device), positions, MomentAttention(positions, model.inv_freq, biases, group,
                                                                           moments))
        if progress:
            progress()
    out = {}
    for kind in "kv":
        values, vectors = torch.linalg.eigh(moments[kind])                       # ascending
        out[f"{kind}_basis"] = vectors.flip(-1).float().cpu()
        out[f"{kind}_spectrum"] = values.flip(-1).clamp(min=0).sqrt().float().cpu()
        out[f"{kind}_bias"] = torch.stack([b[0 if kind == "k" else 1].view(G, -1) for b in biases]).float().cpu()
    return out


def fisher_information(model, config, texts: list[list[int]], progress=None) -> dict[str, torch.Tensor]:
    """Palu's Fisher information of each layer's W_k and W_v: per weight, the root mean square over
    `texts` of the language-modelling loss's gradient, averaged over the weight
    -> {k_fisher, v_fisher [L]}. The model's parameters are left as they were."""
    device = model.inv_freq.device
    weights = [layer.self_attn.qkv_proj.weight for layer in model.layers]
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    squares = torch.zeros(config.num_layers, 2, dtype=torch.float64, device=device)
    rows = [config.q_size, config.q_size + config.kv_size, config.q_size + 2 * config.kv_size]
    total = [torch.zeros(w.shape[0] - config.q_size, w.shape[1], dtype=torch.float64, device=device) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for ids in texts:
            positions = torch.arange(len(ids), device=device)
            tokens = torch.tensor(ids, device=device)
            with torch.enable_grad():
                hidden = model(tokens, positions, DenseAttention(positions))
                logits = model.compute_logits(hidden[:-1])
                loss = torch.nn.functional.cross_entropy(logits, tokens[1:])
                grads = torch.autograd.grad(loss, weights)
            for t, g in zip(total, grads):
                t += g[rows[0]:].double() ** 2
            if progress:
                progress()
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)
    for layer, t in enumerate(total):
        rms = (t / len(texts)).sqrt()
        squares[layer, 0] = rms[:config.kv_size].mean()
        squares[layer, 1] = rms[config.kv_size:].mean()
    return {"k_fisher": squares[:, 0].float().cpu(), "v_fisher": squares[:, 1].float().cpu()}


def default_group(num_kv_heads: int, wanted: int = 4) -> int:
    """Palu's group of 4 consecutive kv-heads, or the largest divisor of the model's kv-heads below
    it (Palu requires the group to divide them)."""
    return max(g for g in range(1, min(wanted, num_kv_heads) + 1) if num_kv_heads % g == 0)
