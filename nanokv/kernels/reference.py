"""Plain-torch reference attention: the maths every kernel in this folder must reproduce.

Masks are built from positions, not from slot indices: after a compression method has
dropped tokens, slot i no longer sits at position i, but "key position <= query position"
and "query position - key position < window" stay true statements about the tokens.

`attention_by_position` is the dense, all-float32 statement of the maths; `paged_attention`
is what the engine runs on CPU: the same rule over per-head block tables, with the scores and
softmax in float32 and P @ V in the storage dtype. Decode spells the maths out: torch's
scaled_dot_product_attention took ~50 ms a call on CPU for some bfloat16 key lengths, a
thousand times its usual cost. Long prefill chunks do call it: there it never materializes the
score matrix, and measured 2.8x faster than the spelled-out form (1024 queries over 2048 keys,
bfloat16: 36 ms against 105 ms a layer).
"""

import math

import torch


def attention_by_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_pos: torch.Tensor, k_pos: torch.Tensor,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of one sequence, GQA allowed.

    q: [T, Hq, D]; k, v: [S, Hkv, D]; q_pos: [T]; k_pos: [S] -> [T, Hq, D].
    A query sees a key when k_pos <= q_pos and, with a window W, q_pos - k_pos < W.
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    group = Hq // Hkv  # query heads sharing one kv-head (GQA)
    qf = q.float().view(T, Hkv, group, D).permute(1, 2, 0, 3)         # [Hkv, group, T, D]
    kf = k.float().permute(1, 2, 0).unsqueeze(1)                      # [Hkv, 1, D, S]
    vf = v.float().transpose(0, 1).unsqueeze(1)                       # [Hkv, 1, S, D]
    scores = (qf @ kf) * (1.0 / math.sqrt(D))                         # [Hkv, group, T, S]
    allowed = k_pos[None, :] <= q_pos[:, None]                        # [T, S]
    if sliding_window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(dim=-1) @ vf                                 # [Hkv, group, T, D]
    return out.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


def paged_attention(q: torch.Tensor, q_pos: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    pos_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                    sliding_window: int | None = None, workspace: "Workspace | None" = None,
                    return_probs: bool = False, bias_pool: torch.Tensor | None = None):
    """Attention of B sequences' queries over their paged, per-head KV.

    q: [B, T, Hq, D] and q_pos: [B, T] (decode: T = 1; prefill: one sequence, B = 1);
    k_pool, v_pool: [num_blocks, block_size, D]; pos_pool: [num_blocks, block_size];
    tables: [B, Hkv, nb] block ids (entries past a head's blocks are ignored, may be -1);
    slots past a head's length are masked, but must hold finite values;
    lengths: [B, Hkv] tokens held per head. Heads may hold different numbers of tokens.
    -> [B, T, Hq, D]. Same masking rule as `attention_by_position`. A `workspace` lends the
    buffers the gathered K, V and positions are copied into. With `return_probs`, also the
    attention probabilities [B, Hkv, group, T, nb * block_size] (float32, 0 where masked), slot
    by slot of each head's table: what H2O and TOVA score with. With `bias_pool` [num_blocks,
    block_size] float32 (a method's slot field: KeepKV's log vote counts), each slot's value is added
    to its scaled logit, for every query that sees it: a slot of bias log c weighs as c copies of itself.
    """
    workspace = workspace or Workspace()
    k = gather_blocks(k_pool, tables, workspace.get("k", k_pool, tables))  # [B, Hkv, S, D]
    v = gather_blocks(v_pool, tables, workspace.get("v", v_pool, tables))
    k_pos = gather_blocks(pos_pool, tables, workspace.get("pos", pos_pool, tables))  # [B, Hkv, S]
    bias = None if bias_pool is None else gather_blocks(bias_pool, tables)          # [B, Hkv, S]
    return attend(q, q_pos, k, v, k_pos, lengths, sliding_window, return_probs, bias)


def attend(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor,
           lengths: torch.Tensor, sliding_window: int | None = None, return_probs: bool = False,
           bias: torch.Tensor | None = None):
    """paged_attention once each head's keys are gathered: k [B, Hkv, S, D], v [B, Hkv, S, Dv],
    k_pos [B, Hkv, S], the slots past lengths [B, Hkv] finite and masked, bias [B, Hkv, S] float32
    added to each slot's logit (or None) -> [B, T, Hq, Dv]. (A
    latent cache rebuilds its keys and hands its values' latents, Dv = their rank:
    nanokv/cache/latent_cache.py.)"""
    B, T, Hq, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    if T >= SDPA_MIN_QUERIES and not return_probs:
        return _prefill_sdpa(q, q_pos, k, v, k_pos, lengths, sliding_window, bias)
    # Slots past a head's length are masked out; they must hold finite values (0 * NaN = NaN),
    # which the pool guarantees by zeroing blocks as it hands them out.
    allowed = allowed_keys(q_pos, k_pos, lengths, sliding_window)                        # [B, Hkv, T, S]
    # The query heads of a group share their kv-head: fold them into the query axis, so one
    # plain batched matmul per kv-head serves the group (a broadcast matmul would copy K per head).
    qg = q.view(B, T, Hkv, group, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, group * T, D)
    # Scores and softmax in float32, as the Triton and C++ kernels and torch's SDPA accumulate
    # them: rounded to bfloat16 (steps of 0.125 near 20), scores flipped SmolLM2's greedy answer
    # to the README's first prompt. P @ V stays in the storage dtype (a float32 accumulation).
    scores = (qg.float() @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(D))  # [B, Hkv, group*T, S]
    if bias is not None:  # before the mask: a masked slot stays -inf whatever its bias
        scores += bias.float()[:, :, None, :]
    scores.view(B, Hkv, group, T, S).masked_fill_(~allowed[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs.to(v.dtype) @ v).view(B, Hkv, group, T, Dv)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, Dv).to(q.dtype)
    return (out, probs.view(B, Hkv, group, T, S)) if return_probs else out


def quantized_decode_attention(q: torch.Tensor, q_pos: torch.Tensor, quant: "QuantBlocks", qtables: torch.Tensor,
                               qlens: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                               tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention of B sequences over a quantized cache: each head holds qlens[b, h] tokens
    in quantized blocks (qtables [B, Hkv, nq], oldest first) followed by lengths[b, h] tokens in
    full-precision blocks (tables [B, Hkv, nb], the residual). q [B, Hq, D], q_pos [B] -> [B, Hq, D].

    Quantized tokens are all older than the query and carry no positions, so each is visible;
    full-precision ones follow the usual rule by position. This twin dequantizes every block to
    float32 first (what transformers' quantized caches do at every step, and why KIVI is slower
    than `full` on CPU); the Triton kernel dequantizes in registers as it reads."""
    from nanokv.kernels.quant import dequantize_tokens

    k_q = dequantize_tokens(gather_blocks(quant.k_codes, qtables), gather_blocks(quant.k_scale, qtables),
                            gather_blocks(quant.k_zero, qtables), quant.k_bits, quant.group_size, quant.keys_per_channel)
    v_q = dequantize_tokens(gather_blocks(quant.v_codes, qtables), gather_blocks(quant.v_scale, qtables),
                            gather_blocks(quant.v_zero, qtables), quant.v_bits, quant.group_size, False)
    return dequantized_decode_attention(q, q_pos, k_q, v_q, qlens, k_pool, v_pool, pos_pool, tables, lengths)


def dequantized_decode_attention(q: torch.Tensor, q_pos: torch.Tensor, k_q: torch.Tensor, v_q: torch.Tensor,
                                 qlens: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                 pos_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """quantized_decode_attention with the cold part already decoded: k_q, v_q [B, Hkv, Sq, D]
    float32, of which each head holds the first qlens[b, h] (any codec's blocks, decoded)."""
    B, Hq, D = q.shape
    Hkv = tables.shape[1]
    group = Hq // Hkv
    k_pos = gather_blocks(pos_pool, tables)                                              # [B, Hkv, Sf]
    held_q = torch.arange(k_q.shape[2], device=q.device) < qlens[..., None]              # [B, Hkv, Sq]
    allowed = torch.cat([held_q, allowed_keys(q_pos[:, None], k_pos, lengths, None)[:, :, 0]], dim=-1)
    # One softmax over both parts; the two parts' keys and values are never concatenated (a
    # copy of the whole dequantized cache per layer).
    qg = q.float().view(B, Hkv, group, D)
    k_f, v_f = gather_blocks(k_pool, tables).float(), gather_blocks(v_pool, tables).float()
    scores = torch.cat([qg @ k_q.transpose(-1, -2), qg @ k_f.transpose(-1, -2)], dim=-1) * (1.0 / math.sqrt(D))
    probs = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(dim=-1)     # [B, Hkv, group, S]
    Sq = k_q.shape[2]
    return (probs[..., :Sq] @ v_q + probs[..., Sq:] @ v_f).view(B, Hq, D).to(q.dtype)


def latent_attention(q: torch.Tensor, q_pos: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     pos_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, slots_per_token: int,
                     k_basis: torch.Tensor, k_bias: torch.Tensor, ranks: tuple[int, int], cos: torch.Tensor,
                     sin: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Attention over a latent cache's groups (nanokv/cache/latent_cache.py): q [B, T, Hq, D],
    q_pos [B, T]; k_pool, v_pool [N, block_size, C] the latents' chunks, pos_pool [N, block_size];
    tables [B, G, nb] and lengths [B, G] (slots, `slots_per_token` a token) of each head group;
    k_basis [G, group * D, r_k] and k_bias [G, group * D] float32, ranks (r_k, r_v); cos, sin
    [P, D] float32 RoPE tables by position. -> the attention over each kv-head's value latents,
    [B, T, Hq, r_v] in q's dtype (the cache takes it through the value basis): `attend` over
    latent_keys, cast to q's dtype."""
    keys, values, positions, held = latent_keys(k_pool, v_pool, pos_pool, tables, lengths, slots_per_token, k_basis,
                                                k_bias, ranks, cos, sin)
    return attend(q, q_pos, keys.to(q.dtype), values.to(q.dtype), positions, held, sliding_window)


def latent_keys(k_pool, v_pool, pos_pool, tables, lengths, slots_per_token, k_basis, k_bias, ranks, cos, sin):
    """What latent_attention attends over, gathered: the keys rebuilt from their latents and
    rotated at their positions [B, H, S, D] float32, each kv-head's value latents [B, H, S, r_v]
    (its group's), positions [B, H, S], tokens held [B, H]. The kv-heads a group holds
    (group = k_basis.shape[1] // D, H = G * group) come from the basis; a token's position is
    read from its first slot in the first group (every group holds the same tokens)."""
    B, G = tables.shape[:2]
    D, m = cos.shape[-1], slots_per_token
    r_k, r_v = ranks
    group = k_basis.shape[1] // D
    H = G * group
    k_chunks, v_chunks = gather_blocks(k_pool, tables), gather_blocks(v_pool, tables)
    S = k_chunks.shape[2] // m
    latent = torch.stack([k_chunks[:, :, :S * m], v_chunks[:, :, :S * m]], dim=3).view(B, G, S, -1).float()
    # a token's heads sit side by side in its group's latent: [B, S, G, group * D] -> [B * S, H, D]
    k_pre = (torch.einsum("bgsr,gdr->bsgd", latent[..., :r_k], k_basis) + k_bias).reshape(B * S, H, D)
    positions = gather_blocks(pos_pool, tables[:, :1])[:, 0, :S * m:m]                       # [B, S]
    at = positions.flatten()
    keys = apply_rope(k_pre, cos[at], sin[at]).view(B, S, H, D).transpose(1, 2)               # [B, H, S, D]
    values = latent[..., r_k:r_k + r_v].repeat_interleave(group, dim=1)                       # [B, H, S, r_v]
    return keys, values, positions[:, None].expand(B, H, S), (lengths // m).repeat_interleave(group, dim=1)


def pruned_attention(q: torch.Tensor, q_pos: torch.Tensor, slim_k: torch.Tensor, slim_v: torch.Tensor,
                     slim_pos: torch.Tensor, stables: torch.Tensor, slim_lengths: torch.Tensor, channels: torch.Tensor,
                     k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor, tables: torch.Tensor,
                     lengths: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Attention of B sequences' queries q [B, T, Hq, D] (q_pos [B, T]) over heads whose oldest
    slim_lengths[b, h] tokens keep only the key channels channels[b, h] (kD of them; ThinK): slim
    blocks slim_k [N, n, kD], slim_v [N, n, D], slim_pos [N, n] through stables [B, Hkv, ns], then
    full-precision blocks through tables and lengths as in paged_attention. -> [B, T, Hq, D].

    For a slim token the query is cut to the head's kept channels, so q . k sums over those alone:
    attention with the pruned channels zeroed. The scale stays 1 / sqrt(D). One softmax over both
    parts, which are never concatenated."""
    B, T, Hq, D = q.shape
    Hkv = tables.shape[1]
    group = Hq // Hkv
    k_s, v_s = gather_blocks(slim_k, stables).float(), gather_blocks(slim_v, stables).float()  # [B, Hkv, Ss, .]
    k_f, v_f = gather_blocks(k_pool, tables).float(), gather_blocks(v_pool, tables).float()
    allowed = torch.cat([allowed_keys(q_pos, gather_blocks(slim_pos, stables), slim_lengths, sliding_window),
                         allowed_keys(q_pos, gather_blocks(pos_pool, tables), lengths, sliding_window)], dim=-1)
    qg = q.float().view(B, T, Hkv, group, D).permute(0, 2, 3, 1, 4)                           # [B, Hkv, g, T, D]
    kept = channels[:, :, None, None, :].expand(B, Hkv, group, T, channels.shape[-1])
    scores = torch.cat([qg.gather(-1, kept) @ k_s[:, :, None].transpose(-1, -2),
                        qg @ k_f[:, :, None].transpose(-1, -2)], dim=-1) * (1.0 / math.sqrt(D))
    probs = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(dim=-1)          # [B, Hkv, g, T, S]
    Ss = k_s.shape[2]
    out = probs[..., :Ss] @ v_s[:, :, None] + probs[..., Ss:] @ v_f[:, :, None]
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)


HIDDEN = torch.iinfo(torch.int32).max  # a position no query reaches: the slot is masked


def paired_attention(q: torch.Tensor, q_pos: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     pos_pool: torch.Tensor, k_mag: torch.Tensor, v_mag: torch.Tensor, tables_a: torch.Tensor,
                     lengths_a: torch.Tensor, tables_b: torch.Tensor, lengths_b: torch.Tensor,
                     sliding_window: int | None = None) -> torch.Tensor:
    """MiniCache's layer b of a merged pair (nanokv/cache/paired.py): queries q [B, T, Hq, D] over
    layer a's slots with K and V restored to b's magnitudes k_mag, v_mag [N, block_size] (a slot
    of K magnitude 0 is a's alone: not read), then layer b's own slots; tables_a, tables_b
    [B, H, nb], lengths_a, lengths_b [B, H]. -> [B, T, Hq, D]."""
    return attend(q, q_pos, *paired_keys(k_pool, v_pool, pos_pool, k_mag, v_mag, tables_a, lengths_a, tables_b,
                                         lengths_b), sliding_window)


def paired_keys(k_pool, v_pool, pos_pool, k_mag, v_mag, tables_a, lengths_a, tables_b, lengths_b):
    """What paired_attention attends over, gathered: a's slots restored (those b does not read, and
    any past a's length, at a position no query reaches), then b's own. -> keys, values [B, H, S, D]
    (the pool's dtype), positions [B, H, S], lengths [B, H]."""
    block_size = k_pool.shape[1]
    parts = []
    for tables, lengths, restore in ((tables_a, lengths_a, True), (tables_b, lengths_b, False)):
        tables = tables[..., :int((lengths.max() + block_size - 1) // block_size)]
        k, v, pos = (gather_blocks(f, tables) for f in (k_pool, v_pool, pos_pool))
        held = torch.arange(k.shape[2], device=k.device) < lengths[..., None]
        if restore:
            k_len, v_len = gather_blocks(k_mag, tables), gather_blocks(v_mag, tables)
            held = held & (k_len > 0)
            k, v = restored(k, k_len), restored(v, v_len)
        parts.append((k, v, pos.masked_fill(~held, HIDDEN)))
    keys, values, positions = (torch.cat(x, dim=2) for x in zip(*parts))
    return keys, values, positions, torch.full_like(lengths_b, keys.shape[2])


def restored(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Vectors x [..., D] with their length set to `magnitude` [...] (0 where x is 0)."""
    xf = x.float()
    return (xf * (magnitude / xf.norm(dim=-1).clamp(min=1e-30))[..., None]).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings, rotate-half layout (the model's, nanokv/models/rope.py): x [T, heads,
    head_dim]; cos/sin [T, head_dim]."""
    from nanokv.kernels import cpu

    if cpu.serves(x, cos, sin):  # the same, bit for bit, in one C++ pass
        return cpu.rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Quest's page bounds: q [B, Hq, D]; kmin, kmax [num_blocks, D] the per-channel min and max of
    each block's keys; tables [B, Hkv, nb] (-1 past a head's blocks) -> [B, Hkv, nb] float32, for each page the largest over the kv-head's query heads of
    sum_c max(q_c * kmax_c, q_c * kmin_c), an upper bound of q . k for every key in the page;
    -inf for -1 entries."""
    B, Hq, D = q.shape
    Hkv = tables.shape[1]
    blocks = tables.clamp(min=0)
    low, high = kmin[blocks].float()[:, :, None], kmax[blocks].float()[:, :, None]  # [B, Hkv, 1, nb, D]
    qg = q.float().view(B, Hkv, Hq // Hkv, 1, D)
    bounds = torch.maximum(qg * high, qg * low).sum(-1).amax(2)
    return bounds.masked_fill(tables < 0, float("-inf"))


def quest_pages(bounds: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's pick (nanokv/methods/quest.py) from the page bounds [b, H, nb] (page_scores) of heads
    holding `lengths` [b, H] tokens in `tables` [b, H, nb]: each head's newest page and its pages - 1
    others of highest bound -> the reduced tables [b, H, k], the picked blocks in table order (-1
    after), and the tokens they hold [b, H]. The newest page is the only partial one, so a head
    loses whole pages. k = min(pages, nb) is known on the host: a decode step runs this in every
    layer, and nothing here waits for the device."""
    nb = tables.shape[-1]
    k = min(pages, nb)
    num_blocks = (lengths + block_size - 1) // block_size
    index = torch.arange(nb, device=tables.device)
    ranked = bounds.masked_fill(index == (num_blocks - 1)[..., None], float("inf"))
    ranked = ranked.masked_fill(index >= num_blocks[..., None], float("-inf"))
    # a head holding fewer than k pages picks them all, then padding, which sorts after them
    picked = ranked.topk(k, dim=-1).indices.sort(dim=-1).values
    reduced = tables.gather(-1, picked).masked_fill(picked >= num_blocks[..., None], -1)
    return reduced, lengths - (num_blocks - num_blocks.clamp(max=k)) * block_size


SDPA_MIN_QUERIES = 512  # below this the spelled-out form was as fast (measured, bfloat16 CPU)


def allowed_keys(q_pos, k_pos, lengths, sliding_window):
    """[B, Hkv, T, S] bool: which held key each query sees (the rule of attention_by_position)."""
    held = torch.arange(k_pos.shape[-1], device=k_pos.device) < lengths[..., None]       # [B, Hkv, S]
    allowed = held[:, :, None, :] & (k_pos[:, :, None, :] <= q_pos[:, None, :, None])
    if sliding_window is not None:
        allowed = allowed & ((q_pos[:, None, :, None] - k_pos[:, :, None, :]) < sliding_window)
    return allowed


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A prompt over its own keys alone: q [T, Hq, D], k, v [T, Hkv, D] of the same T tokens in
    order -> [T, Hq, D]. Causal by index, which is by position for a prompt's increasing
    positions. Torch's fused attention (FlashAttention on a GPU); the kv-heads are repeated
    for the group first, since SDPA's own GQA path may leave the flash backend."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.transpose(0, 1).repeat_interleave(group, dim=0) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True).transpose(0, 1)


def _prefill_sdpa(q, q_pos, k, v, k_pos, lengths, sliding_window, bias=None):
    """paged_attention for many queries through torch's fused attention, one kv-head at a time
    (heads may hold different tokens, so each has its own mask; a bias makes it a float mask)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    allowed = allowed_keys(q_pos, k_pos, lengths, sliding_window)
    if bias is not None:
        allowed = torch.where(allowed, bias.to(q.dtype)[:, :, None, :], float("-inf"))
    qh = q.transpose(1, 2)                                                                 # [B, Hq, T, D]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        qh[:, h * group:(h + 1) * group], k[:, h:h + 1], v[:, h:h + 1], attn_mask=allowed[:, h:h + 1],
        enable_gqa=True) for h in range(Hkv)], dim=1)
    return out.transpose(1, 2).to(q.dtype)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    """Store new tokens: slots [H, T] flat slot ids (block * block_size + offset) of one layer's
    kv-heads; k, v [T, H, D]; positions [T]. The pools are [num_blocks, block_size, D] (K, V) and
    [num_blocks, block_size] (int32 positions)."""
    D, block_size = k_pool.shape[-1], k_pool.shape[1]
    flat = slots.flatten()
    at = (flat // block_size, flat % block_size)  # the pools may be strided views (a quantized pool's rows)
    k_pool[at] = k.transpose(0, 1).reshape(-1, D).to(k_pool.dtype)
    v_pool[at] = v.transpose(0, 1).reshape(-1, D).to(v_pool.dtype)
    pos_pool[at] = positions.to(pos_pool.dtype).repeat(slots.shape[0])


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """pool: [num_blocks, block_size, *rest]; tables: [..., nb] (-1 reads block 0) ->
    [..., nb * block_size, *rest], each head's slots in order (written into `out` if given)."""
    num_blocks, block_size, *rest = pool.shape
    index = tables.clamp(min=0).flatten()
    if not pool[0].is_contiguous():  # rows narrower than their stride (a narrow layer's codes in wide rows)
        assert out is None
        return torch.index_select(pool, 0, index).view(*tables.shape[:-1], tables.shape[-1] * block_size, *rest)
    # index_select over whole blocks is ~6x faster on CPU than advanced indexing
    rows = torch.index_select(pool.view(num_blocks, -1), 0, index, out=out)
    return rows.view(*tables.shape[:-1], tables.shape[-1] * block_size, *rest)


class Workspace:
    """Scratch buffers kept from call to call. On CPU a fresh multi-megabyte tensor per layer
    is fresh memory from the OS each time, and its page faults cost more than the copy into it
    (measured: gathering 10 MB of blocks took 2.6 ms into a new tensor, 0.33 ms into a reused one)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """A [blocks in `tables`, elements per block] buffer for gathering from `pool`."""
        shape = (tables.numel(), pool[0].numel())
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < shape[0] * shape[1] or buf.dtype != pool.dtype:
            buf = torch.empty(shape[0] * shape[1], dtype=pool.dtype, device=pool.device)
            self._buffers[name] = buf
        return buf[:shape[0] * shape[1]].view(shape)


def tile_pairs(T: int, tile: int, device) -> torch.Tensor:
    """[nq, nk] int64: the causal (query, key) pairs of a T-token prompt in each tile (i, j) of
    `tile` x `tile` tokens (the last tiles cut at T): what a block-sparse prefill computes there."""
    n = -(-T // tile)
    q = torch.arange(n * tile, device=device)
    per_key_tile = (q[:, None] - torch.arange(n, device=device)[None, :] * tile + 1).clamp(0, tile)  # [n*tile, nk]
    per_key_tile = per_key_tile.masked_fill((q >= T)[:, None], 0)
    last = (T - torch.arange(n, device=device) * tile).clamp(max=tile)                                 # keys in tile j
    return per_key_tile.clamp(max=last[None, :]).view(n, tile, n).sum(1)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_mask: torch.Tensor,
                           tile: int, chunk: int = 1024) -> torch.Tensor:
    """A prompt over its own keys, only in the tiles a sparse prefill computes: q [T, Hq, D], k, v
    [T, Hkv, D] of the same T tokens in order, tile_mask [Hq, nq, nk] bool (tile (i, j): queries
    i * tile .., keys j * tile ..; nq = nk = ceil(T / tile)) -> [T, Hq, D]. Causal by index within
    the computed tiles; a query whose row computes no tile at all would get NaN, so callers keep
    the diagonal (methods/base.py: SparsePrefill.tile_mask). Scores and softmax in float32, about
    `chunk` queries at a time (whole tiles), so the scores stay bounded."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    kf = k.float().transpose(0, 1).repeat_interleave(group, dim=0)                # [Hq, T, D]
    vf = v.transpose(0, 1).repeat_interleave(group, dim=0)
    rows = max(1, chunk // tile) * tile
    outs = []
    for start in range(0, T, rows):
        end = min(T, start + rows)
        scores = torch.einsum("thd,hsd->hts", q[start:end].float(), kf[:, :end]) * (1.0 / math.sqrt(D))
        tiles = tile_mask[:, start // tile:-(-end // tile), :-(-end // tile)]
        allowed = tiles.repeat_interleave(tile, dim=1).repeat_interleave(tile, dim=2)[:, :end - start, :end]
        causal = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        probs = scores.masked_fill(~(allowed & causal), float("-inf")).softmax(dim=-1)
        outs.append((probs.to(v.dtype) @ vf[:, :end]).transpose(0, 1))
    return torch.cat(outs).to(q.dtype) if outs else torch.empty_like(q)
