"""Decode over two kinds of block in one softmax: ThinK's slim keys and MiniCache's merged pairs.

Both block kinds hold a head's tokens in two runs of blocks that attention reads as one:

- ThinK (nanokv/cache/pruned_cache.py): the oldest tokens in *slim* blocks whose keys keep kD of
  the D channels (per head, `channels`), then the newer ones in full blocks. For a slim token,
  q . k sums over the kept channels alone, so that part's query is q cut to them (a gather of
  [B, Hq, kD] before the launch); the scale stays 1 / sqrt(D).
- MiniCache (nanokv/cache/paired.py): layer b of a merged pair reads layer a's blocks, each slot's
  K and V a direction restored to b's own magnitudes as the tile loads (slots of magnitude 0 are
  a's alone), then b's own blocks.

Each run is a `paged_decode.DecodePart`; `decode_parts` launches the paged decode's split kernel
once per run into one scratch (the slim run with its own key width and block size, the merged
run with its restoring specialization) and one merge, which combines the runs' partial softmaxes
as it combines any splits. Neither part is gathered or concatenated, as the twins
(reference.pruned_attention, reference.paired_attention) do: each byte is read once, in place.
"""

import math

import torch

from nanokv.kernels.paged_decode import DecodePart, decode_parts


def pruned_decode_attention(q, q_pos, slim_k, slim_v, slim_pos, stables, slim_lengths, channels, k_pool, v_pool,
                            pos_pool, tables, lengths, sliding_window=None, blocks_per_split=None):
    """reference.pruned_attention for one query per sequence: q [B, Hq, D], q_pos [B]; slim blocks
    slim_k [N, n, kD], slim_v [N, n, D], slim_pos [N, n] through stables [B, Hkv, ns] with
    slim_lengths [B, Hkv] tokens, their kept channels [B, Hkv, kD]; then full blocks. -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv, kD = channels.shape[1], channels.shape[2]
    group = Hq // Hkv
    kept = channels[:, :, None, :].expand(B, Hkv, group, kD)
    q_slim = q.view(B, Hkv, group, D).gather(-1, kept).reshape(B, Hq, kD)
    parts = [DecodePart(q_slim, slim_k, slim_v, slim_pos, stables, slim_lengths),
             DecodePart(q, k_pool, v_pool, pos_pool, tables, lengths)]
    return decode_parts(parts, q_pos, 1.0 / math.sqrt(D), sliding_window, blocks_per_split=blocks_per_split)


def paired_decode_attention(q, q_pos, k_pool, v_pool, pos_pool, k_mag, v_mag, tables_a, lengths_a, tables_b,
                            lengths_b, sliding_window=None, blocks_per_split=None):
    """reference.paired_attention for one query per sequence: q [B, Hq, D], q_pos [B]; layer a's
    blocks (tables_a, lengths_a) restored to b's magnitudes k_mag, v_mag [N, block_size], then
    layer b's own (tables_b, lengths_b), all in the same pools. -> [B, Hq, D]."""
    parts = [DecodePart(q, k_pool, v_pool, pos_pool, tables_a, lengths_a, (k_mag, v_mag)),
             DecodePart(q, k_pool, v_pool, pos_pool, tables_b, lengths_b)]
    return decode_parts(parts, q_pos, 1.0 / math.sqrt(q.shape[-1]), sliding_window, blocks_per_split=blocks_per_split)
