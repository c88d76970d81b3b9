"""kernels.write_kv (Triton, run by the interpreter on CPU) against kernels.reference.write_kv:
after the same write into NaN-poisoned pools, both pools must be bit-identical, so every written
slot holds the same bits and every untouched slot is still NaN (positions still -1)."""

import pytest
import torch

from nanokv.kernels import reference
from nanokv.kernels.write_kv import write_kv

BLOCK_SIZE = 16


def _pools(num_blocks, D, dtype, device="cpu"):
    k_pool = torch.full((num_blocks, BLOCK_SIZE, D), float("nan"), dtype=dtype, device=device)
    v_pool = torch.full((num_blocks, BLOCK_SIZE, D), float("nan"), dtype=dtype, device=device)
    pos_pool = torch.full((num_blocks, BLOCK_SIZE), -1, dtype=torch.int32, device=device)
    return k_pool, v_pool, pos_pool


def _bits(t):
    """The raw bits of a tensor, so that NaN compares equal to the same NaN."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


def _check(slots, k, v, positions, num_blocks, pool_dtype):
    D, device = k.shape[-1], k.device
    want = _pools(num_blocks, D, pool_dtype, device)
    got = _pools(num_blocks, D, pool_dtype, device)
    reference.write_kv(*want, slots, k, v, positions)
    write_kv(*got, slots, k, v, positions)
    for w, g in zip(want, got):
        assert torch.equal(_bits(w), _bits(g))
    written = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool, device=device)
    written[slots.flatten()] = True
    assert got[0].view(-1, D)[~written].isnan().all() and (got[2].view(-1)[~written] == -1).all()
    assert not got[0].view(-1, D)[written].isnan().any()


@pytest.mark.parametrize("k_dtype,pool_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.float32, torch.float16)],
                         ids=["f32-f32", "f16-f16", "f32-f16"])
@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("H", [1, 3, 8])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_write_kv_matches_reference(k_dtype, pool_dtype, D, H, T, triton_device):
    g = torch.Generator().manual_seed(1000 * H + 10 * T + D)
    num_blocks = (H * T) // BLOCK_SIZE + 3            # a few blocks spare: some slots stay untouched
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:H * T].view(H, T)
    k = (torch.randn(T, H, D, generator=g) * 10).to(k_dtype)  # * 10: plenty of float32 -> float16 rounding
    v = (torch.randn(T, H, D, generator=g) * 10).to(k_dtype)
    positions = torch.randint(0, 100_000, (T,), generator=g)
    _check(*(t.to(triton_device) for t in (slots, k, v, positions)), num_blocks, pool_dtype)


def test_write_kv_strided_inputs():
    """k, v and slots as non-contiguous views, positions already int32: strides are honoured."""
    g = torch.Generator().manual_seed(0)
    H, T, D, num_blocks = 4, 9, 80, 5
    k = torch.randn(H, T, D, generator=g).transpose(0, 1)                  # [T, H, D], strided
    v = torch.randn(T, H, 2 * D, generator=g)[..., ::2]                    # last dim stride 2
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:H * T].view(T, H).t()
    positions = torch.arange(T, dtype=torch.int32) * 3
    _check(slots, k, v, positions, num_blocks, torch.float16)
