"""The model run over calibration text with a plain attention of its own, recording what a
profile needs: no cache, no compression, the `attention` callable of nanokv/models/llama.py."""

from __future__ import annotations

import random

import torch

CHUNK_BYTES = 1 << 27  # the dense attention's score matrix per chunk of queries


class DenseAttention:
    """The model's `attention` callable (nanokv/models/llama.py) for one sequence at `positions`: plain
    causal attention (GQA, float32, nanokv/kernels/reference.py) over the sequence's own keys, no cache.
    `record(layer, q, k, sliding_window)` sees each layer's post-RoPE queries and keys first. With
    `sources`, layer l attends over layer sources[l]'s keys and values (KVSharer's sharing); `kv`
    keeps each layer's own."""

    def __init__(self, positions: torch.Tensor, record=None, sources: list[int] | None = None):
        self.positions, self.record, self.sources, self.kv = positions, record, sources, {}

    def __call__(self, layer, q, k, v, sliding_window):
        from nanokv.kernels.reference import attention_by_position

        if self.record:
            self.record(layer, q, k, sliding_window)
        if self.sources is not None:
            self.kv[layer] = (k, v)
            k, v = self.kv[self.sources[layer]]
        out = torch.empty_like(q)
        rows = max(1, CHUNK_BYTES // (4 * q.shape[1] * len(k)))
        for start in range(0, len(q), rows):
            part = slice(start, start + rows)
            out[part] = attention_by_position(q[part], k, v, self.positions[part], self.positions, sliding_window)
        return out


@torch.inference_mode()
def run_dense(model, ids: list[int], record=None, sources: list[int] | None = None):
    """One forward pass of `ids` (positions 0..) through `model` with DenseAttention (`record`
    seeing every layer; `sources` sharing layers) -> (final hidden states [T, hidden] float32,
    with `sources` each layer's own keys and values)."""
    device = model.inv_freq.device
    positions = torch.arange(len(ids), device=device)
    attention = DenseAttention(positions, record, sources)
    hidden = model(torch.tensor(ids, device=device), positions, attention)
    return hidden.float(), attention.kv


def calibration_texts(tokenizer, samples: int, length: int, seed: int) -> list[list[int]]:
    """`samples` token-id lists of `length` tokens each: varied prose (nanokv/haystack.py),
    the same for a given seed."""
    from nanokv.haystack import prose_sentences

    texts = []
    for i in range(samples):
        rng = random.Random(f"calibrate/text/{seed}/{i}")
        sentences = prose_sentences(rng, max(8, length // 8))
        ids = tokenizer.encode(" ".join(sentences))
        while len(ids) < length:
            sentences += prose_sentences(rng, max(8, length // 8))
            ids = tokenizer.encode(" ".join(sentences))
        texts.append(ids[:length])
    return texts
