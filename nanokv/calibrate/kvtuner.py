"""KVTuner's layer sensitivities (nanokv/methods/kvtuner.py): for every layer and every candidate
(K bits, V bits) pair, the relative error of the layer's attention output when its keys and values
alone are quantized by the runtime's codec, on calibration text.

Per sample and layer: the layer's queries, keys and values (post-RoPE, as the cache stores them)
from a dense pass; the first whole blocks of R = residual_length tokens of each kv-head encoded and
decoded by KVTunerCodec with the pair; causal attention of every query over the quantized K/V
against the exact one; error = sum ||O_q - O||^2 / sum ||O||^2 over samples (the paper's relative
attention-output error). Every layer is measured on the exact model (its input is not perturbed by
other layers' quantization), so the errors of different layers add as a first-order proxy.
"""

from __future__ import annotations

import torch

from nanokv.calibrate.dense import DenseAttention
from nanokv.methods.kvtuner import PAIRS, KVTunerCodec


def quantized_kv(codec: KVTunerCodec, layer: int, k: torch.Tensor, v: torch.Tensor):
    """k, v [T, H, D] -> the first T // R * R tokens of each head through the codec, [T', H, D] float32."""
    R = codec.block_size
    T = len(k) // R * R
    blocks = lambda x: x[:T].transpose(0, 1).reshape(-1, R, x.shape[-1])  # noqa: E731  [H * T / R, R, D]
    kq, vq = codec.decode(codec.encode(blocks(k), blocks(v), layer, None), layer)
    heads = k.shape[1]
    unblock = lambda x: x.reshape(heads, T, -1).transpose(0, 1)  # noqa: E731
    return unblock(kq), unblock(vq)


class ErrorAttention(DenseAttention):
    """DenseAttention that also adds, per layer and candidate pair, the squared error of the
    attention output over K/V quantized with that pair, and the output's squared norm."""

    def __init__(self, positions, codecs: list[KVTunerCodec], errors: torch.Tensor, norms: torch.Tensor):
        super().__init__(positions)
        self.codecs, self.errors, self.norms = codecs, errors, norms

    def __call__(self, layer, q, k, v, sliding_window):
        from nanokv.kernels.reference import attention_by_position

        out = super().__call__(layer, q, k, v, sliding_window)
        T = len(k) // self.codecs[0].block_size * self.codecs[0].block_size
        pos = self.positions[:T]
        exact = attention_by_position(q[:T].float(), k[:T].float(), v[:T].float(), pos, pos, sliding_window)
        self.norms[layer] += exact.double().square().sum()
        for p, codec in enumerate(self.codecs):
            kq, vq = quantized_kv(codec, 0, k, v)
            approx = attention_by_position(q[:T].float(), kq, vq, pos, pos, sliding_window)
            self.errors[layer, p] += (approx - exact).double().square().sum()
        return out


@torch.inference_mode()
def kvtuner_errors(model, config, texts: list[list[int]], group_size: int = 32, residual_length: int = 32,
                   progress=None) -> torch.Tensor:
    """[L, len(PAIRS)] relative attention-output errors of each layer under each candidate pair."""
    L, device = config.num_layers, model.inv_freq.device
    codecs = [KVTunerCodec([pair], group_size, residual_length) for pair in PAIRS]
    errors = torch.zeros(L, len(PAIRS), dtype=torch.float64, device=device)
    norms = torch.zeros(L, dtype=torch.float64, device=device)
    for ids in texts:
        if len(ids) < residual_length:
            raise ValueError(f"calibration texts must hold at least residual_length={residual_length} tokens")
        positions = torch.arange(len(ids), device=device)
        model(torch.tensor(ids, device=device), positions, ErrorAttention(positions, codecs, errors, norms))
        if progress:
            progress()
    return (errors / norms.clamp_min(1e-30)[:, None]).float().cpu()

