"""cacheblend: chunks of the context prefilled apart, then the tokens whose KV deviates most recomputed.

Paper: "CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge Fusion",
Jiayi Yao, Hanchen Li, Yuhan Liu, Siddhant Ray, Yihua Cheng, Qizheng Zhang, Kuntai Du, Shan Lu,
Junchen Jiang (EuroSys 2025), arXiv 2405.16444. Code: LMCache/LMCache (lmcache/v1/compute/blend/
blender.py), earlier YaoJiayi/CacheBlend.

A RAG prompt is several retrieved texts whose KV was computed ahead of time, each text alone. Reused
as they are, the texts never attend to one another. CacheBlend fuses them:

    1. each chunk's KV as if the chunk stood alone (attention within the chunk, keys rotated to the
       chunk's place in the prompt);
    2. a second forward over the whole prompt: the layers before the check layer (1) recompute every
       token; at the check layer every token's new K/V is compared with its chunk-alone K/V, and only
       the `recompute_ratio` share that deviates most (HKVD: the highest squared L2 distance over
       all heads and channels) goes on; from there each layer recomputes only those tokens: their
       queries attend over the blended cache (the others' chunk-alone K/V, their own new K/V), and
       their new K/V overwrite their slots.

nanokv serves one request and keeps no store of precomputed chunks, so step 1 runs here, in the
prefill: the engine (nanokv/engine/blending.py) runs the model once over the whole context with
each chunk attending only over itself, at its final positions. That equals the paper's chunk
cached at position 0 and re-rotated: RoPE is a rotation by position, so rotating a key computed at
position j by an offset p gives the key at position p + j, and attention within the chunk only
sees differences of positions.

Defaults and their sources:
    recompute_ratio 0.15: LMCache's blend_recompute_ratios (LMCACHE_BLEND_RECOMPUTE_RATIOS, its
        examples/blend_kv_v1 and config docs).
    check_layer 1: LMCache's blend_check_layers (LMCACHE_BLEND_CHECK_LAYERS); the paper selects from
        layer 1 on (≈ re-check the section).
    deviation "keys": LMCache's blender (lmcache/v1/compute/blend/blender.py), the sum over heads and
        channels of (k_new - k_cached)^2, keys after RoPE, in float32; the paper's first code
        (YaoJiayi/CacheBlend, vllm_blend/vllm/attention/backends/xformers.py) sums (v_new - v_cached)^2
        instead: deviation="values". Top max(1, int(T * ratio)) tokens.
    chunk boundaries: LMCache splits the prompt at a separator string (blend_special_str " # # ";
        its first integration at a separator token id); nanokv ends a chunk after each `separator_id`
        token (none by default) and every `chunk_tokens` tokens (256: LMCache's storage chunk,
        LMCACHE_CHUNK_SIZE; nanokv's choice, since a prompt of token ids carries no separator).

What differs:
    - The chunks' KV is computed in the same prefill, not loaded from a store: nanokv's prefill does
      the chunk-alone forward and then the blend, so it is SLOWER than a full prefill (about 1 +
      recompute_ratio of its linear-layer work); what it shows is the quality of the blended cache
      and the attention work of the blend. Prefill attention FLOPs, with L layers, check layer c,
      n tokens, chunks n_i and k = recompute_ratio * n recomputed: chunk-alone sum_i n_i^2 / 2 per
      layer and head, blend c * n^2 / 2 + (L - c) * k * n (k queries over up to n keys), against
      full's L * n^2 / 2 (each times 4 * D per query head).
    - The separator is a token id, not a string matched in the text (methods never tokenize).
    - The token the runner samples from (the context's last) is always recomputed, as in
      YaoJiayi/CacheBlend; LMCache leaves it to the top-k. A question after the context
      (LLM.generate's (context, question) pairs) is prefilled whole over the blended cache, as
      YaoJiayi/CacheBlend always recomputes its suffix and leaves it out of the top-k.
    - One check layer, as LMCache (whose list of check layers reads only its first ratio); the
      paper's gradual filtering (a smaller share at each later layer) is not done.
    - Nothing is evicted: the cache holds every token, as full's does. A check_layer at or past the
      model's last layer recomputes every token everywhere: full's prefill (after the chunk pass).
"""

from __future__ import annotations

import torch

from nanokv.methods.base import Method


class CacheBlend(Method):
    name = "cacheblend"
    description = "chunks prefilled apart, then the 15% of tokens whose keys deviate most recomputed (HKVD)"
    paper = "https://arxiv.org/abs/2405.16444"
    blends = True
    options = {
        "recompute_ratio": (float, 0.15, "a share in (0, 1] (LMCache: 0.15)", lambda r: 0 < r <= 1),
        "check_layer": (int, 1, "a layer >= 1 (LMCache: 1)", lambda layer: layer >= 1),
        "chunk_tokens": (int, 256, "a positive number of tokens (LMCache's chunk: 256)", lambda n: n > 0),
        "separator_id": (int, -1, "a token id that ends a chunk, or -1 for none", lambda t: t >= -1),
        "deviation": (str, "keys", "keys (LMCache) or values (YaoJiayi/CacheBlend)", lambda d: d in ("keys", "values")),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        if compression or budget is not None:
            raise ValueError(f"cacheblend keeps every token and takes no compression or budget (got compression="
                             f"{compression!r}, budget={budget!r}); its knob is recompute_ratio, e.g. 0.15")
        super().__init__(**options)

    @property
    def compresses(self) -> bool:
        return True  # it acts on every prefill (runner.py: _blended_prefill), though it evicts nothing

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n

    def chunk_lengths(self, ids: list[int]) -> list[int]:
        """The lengths of the chunks the context `ids` is prefilled in, each alone: a chunk ends
        after a separator token and after chunk_tokens tokens."""
        lengths, start = [], 0
        for i, token in enumerate(ids):
            if token == self.separator_id or i + 1 - start == self.chunk_tokens:
                lengths.append(i + 1 - start)
                start = i + 1
        return lengths + ([len(ids) - start] if start < len(ids) else [])

    def recompute(self, new: dict[str, torch.Tensor], cached: dict[str, torch.Tensor]) -> torch.Tensor:
        """new, cached: {"k", "v": [H, T, D]} each token's K/V recomputed at the check layer and its
        chunk-alone K/V -> [T] bool: the tokens recomputed from here on (the last always: it is
        sampled from)."""
        field = "k" if self.deviation == "keys" else "v"
        distance = (new[field].float() - cached[field].float()).pow(2).sum(dim=(0, 2))   # [T]
        k = max(1, int(len(distance) * self.recompute_ratio))
        picked = torch.zeros(len(distance), dtype=torch.bool, device=distance.device)
        picked[distance.topk(k).indices] = True
        picked[-1] = True
        return picked
