"""Attention kernels behind one interface. They take tensors and block tables and know nothing
of sequences or scheduling. `reference.py` holds the plain-torch maths every kernel must match;
the Triton kernels each have a file of their own (docs/kernels.md lists them); the .cpp files are
the CPU's decodes (nanokv/kernels/cpu.py builds them at first use).

    kernels = kernels_for(device)          # Triton on CUDA, C++ decode and plain torch on CPU
    kernels.decode(q [B, Hq, D], q_pos [B], k_pool, v_pool, pos_pool, tables, lengths, window, return_probs,
                   bias=None)
    kernels.prefill(q [T, Hq, D], q_pos [T], cu_seqlens [B + 1], k_pool, v_pool, pos_pool, tables, lengths, window,
                    obs_window=W, bias=None)   # with W: also each slot's attention summed over the last W queries
    kernels.fresh_prefill(q [T, Hq, D], k [T, Hkv, D], v)   # a prompt over its own K/V alone (GPU: SDPA)
    kernels.sparse_prefill(q [T, Hq, D], k [T, Hkv, D], v, tile_mask [Hq, nq, nk], tile)  # the same, only in the
                                                                   # tiles a sparse-prefill method keeps
    kernels.write_kv(k_pool, v_pool, pos_pool, slots [H, T], k [T, H, D], v, positions [T])
    kernels.quantized_decode(q [B, Hq, D], q_pos [B], quant (QuantBlocks), qtables, qlens,
                             k_pool, v_pool, pos_pool, tables, lengths)   # over quantized + residual blocks
    kernels.page_scores(q [B, Hq, D], kmin [N, D], kmax [N, D], tables [B, Hkv, nb])  # Quest's page bounds
    kernels.quest_select(q, kmin, kmax, tables, lengths, block_size, pages)  # page_scores + reference.quest_pages
                                                                              # in one call (C++ only)
    kernels.pruned_attention(q [B, T, Hq, D], q_pos [B, T], slim K/V/pos pools, slim tables, slim lengths, channels,
                             K/V/pos pools, tables, lengths, window)   # ThinK: older keys in fewer channels
    kernels.paired_attention(q, q_pos, K/V/pos pools, K/V magnitudes, tables_a, lengths_a, tables_b, lengths_b,
                             window)   # MiniCache: a merged pair's second layer
    kernels.latent_attention(q, q_pos, latent K/V/pos pools, tables, lengths, slots_per_token, k_basis, k_bias,
                             ranks, cos, sin, window)   # LoRC, Palu: over value latents [B, T, Hq, r_v]

`bias`, where given, is a slot field [num_blocks, block_size] float32 added to each slot's scaled
logit (KeepKV's log vote counts: a slot of bias log c weighs as c copies of itself). Without it every
kernel runs exactly its unbiased code; the Triton prefill sends a biased call to its plain-torch twin
(only a method that merges reads merged slots, and its prompt's prefill reads fresh ones).

NANOKV_KERNELS=triton|cpu|reference (or LLM(kernels=...)) overrides the choice: the tests run the
Triton kernels on CPU under TRITON_INTERPRET=1. Where the C++ kernels cannot be built (no compiler),
"cpu" falls back to the plain-torch twins with a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from nanokv.kernels import reference

KERNELS = ("triton", "cpu", "reference")
PREFILL_QUERY_CHUNK = 1024  # the reference materializes a chunk's scores: keep them bounded


@dataclass(frozen=True)
class Kernels:
    name: str
    decode: Callable
    prefill: Callable
    write_kv: Callable
    quantized_decode: Callable
    page_scores: Callable
    # decode reads each head only to its length, however padded its table: the engine then sends
    # the whole batch in one call per layer rather than one per group of similar lengths
    ragged_decode: bool = False
    # The block kinds beyond plain paged K/V, queries [B, T, Hq, D]: older keys in fewer channels
    # (ThinK's slim blocks), a merged layer pair (MiniCache), tokens as low-rank latents (LoRC,
    # Palu). Triton has decode kernels for them; a prefill over them (rare: a question after a
    # compressed prompt), and every read on CPU, goes through the plain-torch twins.
    pruned_attention: Callable = reference.pruned_attention
    paired_attention: Callable = reference.paired_attention
    latent_attention: Callable = reference.latent_attention
    # Quest's whole page selection in one call, where the kernels have it (the C++ CPU kernels):
    # quest_select(q, kmin, kmax, tables, lengths, block_size, pages) -> the reduced (tables, lengths);
    # elsewhere the engine runs page_scores, then reference.quest_pages
    quest_select: Callable | None = None
    # A prompt the sequence holds alone (no cached prefix, no window) attends over its own K/V,
    # contiguous in hand, rather than through the paged pool: on a GPU torch's fused attention
    # (FlashAttention, ~400 TFLOP/s on an H200) beats any paged kernel there. On CPU the paged
    # path is ~3x faster than SDPA (2,000 tokens, 9/3 heads of 64: 55 vs 180 ms), so it has none.
    fresh_prefill: Callable | None = None
    # A prompt the sequence holds alone, computed only in the (query tile, key tile) pairs a
    # sparse-prefill method keeps (MInference, CritiPrefill): Triton on a GPU, the twin elsewhere.
    sparse_prefill: Callable = reference.block_sparse_attention


def reference_kernels(workspace: reference.Workspace | None = None) -> Kernels:
    """The plain-torch twins, with the signatures of the Triton kernels. `workspace` keeps the
    gather buffers from call to call (see reference.Workspace)."""
    workspace = workspace or reference.Workspace()

    def decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None, return_probs=False,
               bias=None):
        result = reference.paged_attention(q[:, None], q_pos[:, None], k_pool, v_pool, pos_pool, tables, lengths,
                                           sliding_window, workspace, return_probs, bias)
        if return_probs:
            out, probs = result
            return out[:, 0], probs[:, :, :, 0]
        return result[:, 0]

    def prefill(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None,
                obs_window=None, bias=None):
        """-> out, and with obs_window=W also [B, Hq, nb * block_size]: each slot's attention summed
        over the sequence's last W queries, per query head (the Triton kernel's column sums)."""
        outs, sums = [], []
        bounds = cu_seqlens.tolist()
        for b, (start, end) in enumerate(zip(bounds, bounds[1:])):
            window_start, column = end - (obs_window or 0), 0
            for s in range(start, end, PREFILL_QUERY_CHUNK):
                e = min(end, s + PREFILL_QUERY_CHUNK)
                wanted = obs_window is not None and e > window_start
                out = reference.paged_attention(q[None, s:e], q_pos[None, s:e], k_pool, v_pool, pos_pool,
                                                tables[b:b + 1], lengths[b:b + 1], sliding_window, workspace, wanted,
                                                bias)
                if wanted:
                    out, probs = out                                   # [1, Hkv, group, T, S]
                    column = column + probs[0, :, :, max(0, window_start - s):].sum(dim=2)
                outs.append(out[0])
            if obs_window is not None:
                sums.append(column.flatten(0, 1))                      # [Hq, S]
        out = torch.cat(outs)
        return (out, torch.stack(sums)) if obs_window is not None else out

    return Kernels("reference", decode, prefill, reference.write_kv, reference.quantized_decode_attention,
                   reference.page_scores)


def cpu_kernels(workspace: reference.Workspace | None = None) -> Kernels:
    """The plain-torch twins with the C++ decodes (nanokv/kernels/cpu.py) where they apply: full
    precision (with the attention probabilities, for H2O and TOVA, when asked) and quantized."""
    from nanokv.kernels import cpu

    plain = reference_kernels(workspace)
    if not cpu.load():
        return plain

    def decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None, return_probs=False,
               bias=None):
        if q.dtype != k_pool.dtype or (bias is not None and (bias.dtype != torch.float32 or bias.stride(-1) != 1)):
            return plain.decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window, return_probs,
                                bias)
        biased = {} if bias is None else {"bias": bias}
        return cpu.paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, sliding_window, return_probs,
                                **biased)

    def write_kv(k_pool, v_pool, pos_pool, slots, k, v, positions):
        if k_pool.dim() != 3 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or pos_pool.dtype != torch.int32:
            return plain.write_kv(k_pool, v_pool, pos_pool, slots, k, v, positions)
        cpu.write_kv(k_pool, v_pool, pos_pool, slots, k, v, positions)

    def quantized_decode(q, q_pos, quant, qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths):
        if quant.k_scale.dtype != torch.float16 or pos_pool.dtype != torch.int32:
            return plain.quantized_decode(q, q_pos, quant, qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths)
        return cpu.quantized_decode(q, q_pos, quant, qtables, qlens, k_pool, v_pool, pos_pool, tables, lengths)

    return Kernels("cpu", decode, plain.prefill, write_kv, quantized_decode, cpu.page_scores,
                   ragged_decode=True, quest_select=cpu.quest_select)


def triton_kernels() -> Kernels:
    from nanokv.kernels.latent_decode import latent_decode_attention
    from nanokv.kernels.paged_decode import paged_decode_attention
    from nanokv.kernels.prefill import prefill_attention
    from nanokv.kernels.quant_decode import quantized_decode_attention
    from nanokv.kernels.quest import page_scores
    from nanokv.kernels.sparse_prefill import block_sparse_attention
    from nanokv.kernels.two_part_decode import paired_decode_attention, pruned_decode_attention
    from nanokv.kernels.write_kv import write_kv

    plain = reference_kernels()

    def prefill(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths, sliding_window=None,
                obs_window=None, bias=None):
        if bias is not None:  # see the module docstring
            return plain.prefill(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths, sliding_window,
                                 obs_window, bias)
        return prefill_attention(q, q_pos, cu_seqlens, k_pool, v_pool, pos_pool, tables, lengths, sliding_window,
                                 obs_window=obs_window)

    def sparse_prefill(q, k, v, tile_mask, tile):
        if tile < 16 or tile & (tile - 1):  # tl.dot needs 16 rows: a smaller tile runs in plain torch
            return reference.block_sparse_attention(q, k, v, tile_mask, tile)
        return block_sparse_attention(q, k, v, tile_mask, tile)

    return Kernels("triton", paged_decode_attention, prefill, write_kv, quantized_decode_attention,
                   page_scores, ragged_decode=True, fresh_prefill=reference.causal_attention,
                   sparse_prefill=sparse_prefill,
                   pruned_attention=one_query(pruned_decode_attention, reference.pruned_attention),
                   paired_attention=one_query(paired_decode_attention, reference.paired_attention),
                   latent_attention=one_query(latent_decode_attention, reference.latent_attention))


def one_query(kernel: Callable, twin: Callable) -> Callable:
    """A block kind's attention over queries [B, T, Hq, D]: its decode kernel when T = 1 (the
    kernel takes [B, Hq, D]), else its plain-torch twin."""
    def attention(q, q_pos, *args):
        if q.shape[1] != 1:
            return twin(q, q_pos, *args)
        return kernel(q[:, 0], q_pos[:, 0], *args)[:, None]
    return attention


def kernels_for(device, choice: str | None = None, workspace: reference.Workspace | None = None) -> Kernels:
    """Triton on CUDA, the C++ decode on CPU, unless `choice` (or NANOKV_KERNELS) says which."""
    choice = choice or os.environ.get("NANOKV_KERNELS") or ("triton" if str(device).startswith("cuda") else "cpu")
    if choice not in KERNELS:
        raise ValueError(f"unknown kernels {choice!r}; valid: {', '.join(KERNELS)}")
    if choice == "cpu" and str(device).startswith("cuda"):
        raise ValueError("kernels 'cpu' run on the CPU only; on CUDA use 'triton' or 'reference'")
    if choice == "triton":
        return triton_kernels()
    return cpu_kernels(workspace) if choice == "cpu" else reference_kernels(workspace)
