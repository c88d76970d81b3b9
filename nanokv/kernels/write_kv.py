"""Triton twin of `kernels.reference.write_kv`: store new tokens' K, V and positions in their slots.

Every layer of every step writes its new tokens into the pool. In torch that is three scatters
(K, V, positions), each a kernel launch plus the transposes and casts that feed it; on a GPU, one
fused kernel does all three in a single launch, reading k and v where they lie (any strides) and
casting to the pool's dtype on the store. One program stores a tile of BLOCK_T tokens of one
kv-head; head_dim is padded to a power of two (BLOCK_D) and masked, so 80 works as well as 128.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_pool, v_pool, pos_pool, slots, k, v, positions, T, D, block_size,
                     s_kp_b, s_kp_o, s_kp_d, s_vp_b, s_vp_o, s_vp_d, s_pp_b, s_pp_o,
                     s_sl_h, s_sl_t, s_k_t, s_k_h, s_k_d, s_v_t, s_v_h, s_v_d, s_pos,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(1)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)   # [BLOCK_T]
    d = tl.arange(0, BLOCK_D)                                                # [BLOCK_D]
    t_ok = t < T
    mask = t_ok[:, None] & (d[None, :] < D)
    slot = tl.load(slots + h * s_sl_h + t * s_sl_t, mask=t_ok, other=0).to(tl.int64)
    block, offset = slot // block_size, slot % block_size

    kv = tl.load(k + t[:, None] * s_k_t + h * s_k_h + d[None, :] * s_k_d, mask=mask)
    dst = k_pool + (block * s_kp_b + offset * s_kp_o)[:, None] + d[None, :] * s_kp_d
    tl.store(dst, kv.to(k_pool.dtype.element_ty), mask=mask)

    kv = tl.load(v + t[:, None] * s_v_t + h * s_v_h + d[None, :] * s_v_d, mask=mask)
    dst = v_pool + (block * s_vp_b + offset * s_vp_o)[:, None] + d[None, :] * s_vp_d
    tl.store(dst, kv.to(v_pool.dtype.element_ty), mask=mask)

    pos = tl.load(positions + t * s_pos, mask=t_ok)
    tl.store(pos_pool + block * s_pp_b + offset * s_pp_o, pos.to(pos_pool.dtype.element_ty), mask=t_ok)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    """slots [H, T] int64 flat slot ids (block * block_size + offset) of one layer's kv-heads; k, v [T, H, D];
    positions [T]. k_pool, v_pool [num_blocks, block_size, D]; pos_pool [num_blocks, block_size] int32.
    Same result as kernels.reference.write_kv. Slots must be distinct and in range (no bounds check)."""
    H, T = slots.shape
    D = k_pool.shape[-1]
    if H == 0 or T == 0:
        return
    BLOCK_T = min(16, triton.next_power_of_2(T))
    grid = (triton.cdiv(T, BLOCK_T), H)
    _write_kv_kernel[grid](k_pool, v_pool, pos_pool, slots, k, v, positions, T, D, k_pool.shape[1],
                           *k_pool.stride(), *v_pool.stride(), *pos_pool.stride(),
                           *slots.stride(), *k.stride(), *v.stride(), positions.stride(0),
                           BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
