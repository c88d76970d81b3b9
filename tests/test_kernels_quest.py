"""Quest's page scoring: kernels.quest.page_scores (Triton, under the interpreter) against
kernels.reference.page_scores; the bound really bounds q . k from above (both implementations);
and the pick, reference.quest_pages, against a plain-Python brute force. Shapes are tiny."""

import pytest
import torch

from nanokv.kernels import reference
from nanokv.kernels.quest import page_scores
from nanokv.methods import make_method

PAGE = 16


def strided_bounds(gen, num_blocks, D, dtype, device="cpu"):
    """kmin, kmax [num_blocks, D] as column views of one wider tensor (stride(0) != D), kmin <= kmax.
    Every third block holds one key (kmin == kmax): its bound is q . k, negative for about half the
    pages, so a padded query head (bound 0) winning the group's max would show."""
    arena = torch.randn(num_blocks, 2 * D + 8, generator=gen)
    spread = torch.rand(num_blocks, D, generator=gen) * 2 * (torch.arange(num_blocks) % 3 != 0)[:, None]
    arena[:, D + 8:] = arena[:, :D] + spread
    arena = arena.to(device, dtype)
    return arena[:, :D], arena[:, D + 8:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("D", [64, 96])
def test_matches_reference(dtype, group, D, triton_device):
    gen = torch.Generator().manual_seed(D * 10 + group)
    B, Hkv, nb, num_blocks = 2, 2, 37, 60
    q = torch.randn(B, Hkv * group, D, generator=gen).to(dtype)
    kmin, kmax = strided_bounds(gen, num_blocks, D, dtype, triton_device)
    assert kmin.stride(0) == 2 * D + 8
    tables = torch.randint(1, num_blocks, (B, Hkv, nb), generator=gen)
    tables[0, 0, 30:] = -1       # a head holding fewer pages
    tables[1, 1, :] = -1         # a head holding none
    tables[1, 0, 5] = -1         # a hole, for good measure
    q, tables = q.to(triton_device), tables.to(triton_device)
    for block_n in (None, 8):    # 37 pages: never a whole number of tiles
        got = page_scores(q, kmin, kmax, tables, block_n=block_n)
        want = reference.page_scores(q, kmin, kmax, tables)
        assert got.dtype == torch.float32 and got.shape == (B, Hkv, nb)
        held = tables >= 0
        tol = 1e-5 if dtype == torch.float32 else 1e-3  # both upcast to float32: only the sum order differs
        torch.testing.assert_close(got[held], want[held], rtol=tol, atol=tol * D ** 0.5)
        assert torch.isneginf(got[~held]).all()  # documented: -1 entries score -inf


def random_pages(gen, n, keys, D):
    """[n, keys, D] keys mixing sign patterns per channel: some channels all positive, some all
    negative, some constant within a page, the rest of either sign."""
    k = torch.randn(n, keys, D, generator=gen) * 3
    kind = torch.randint(0, 4, (n, 1, D), generator=gen)
    k = torch.where(kind == 0, k.abs(), k)
    k = torch.where(kind == 1, -k.abs(), k)
    return torch.where(kind == 2, k[:, :1].expand_as(k), k)


@pytest.mark.parametrize("impl", [page_scores, reference.page_scores], ids=["triton", "reference"])
def test_bound_is_an_upper_bound(impl):
    gen = torch.Generator().manual_seed(7)
    n, H, D = 200, 4, 40
    tables = torch.arange(n).expand(1, H, n).contiguous()  # every head scores every page
    for trial, keys_per_page in enumerate((PAGE, PAGE, PAGE, 1)):
        keys = random_pages(gen, n, keys_per_page, D)
        kmin, kmax = keys.amin(1), keys.amax(1)
        q = torch.randn(1, H, D, generator=gen)
        if trial == 1:
            q = q.abs()                                          # all positive
        if trial == 2:
            q = q * (torch.rand(1, H, D, generator=gen) < 0.5)   # many zero channels
        bound = impl(q, kmin, kmax, tables)[0]                   # group 1: each query head alone
        best = torch.einsum("hd,nkd->hnk", q[0], keys).amax(-1)  # [H, n]
        scale = torch.einsum("hd,nd->hn", q[0].abs(), torch.maximum(kmin.abs(), kmax.abs()))
        assert (bound >= best - 1e-4 * scale).all()
        if keys_per_page == 1:                                   # a single key: the bound is q . k
            torch.testing.assert_close(bound, best, rtol=0, atol=1e-5 * scale.max().item())


def brute_select(bounds, num_blocks, k):
    """Per head: held pages ordered newest first, then by bound descending; the first k, in
    page order."""
    picks = []
    for b in range(bounds.shape[0]):
        for h in range(bounds.shape[1]):
            held = int(num_blocks[b, h])
            rest = sorted(range(held - 1), key=lambda i: -float(bounds[b, h, i]))
            picks.append(sorted(([held - 1] + rest)[:k] if held else []))
    return picks


@pytest.mark.parametrize("block_size", [16, 32])
def test_quest_pages_brute_force(block_size):
    m = make_method("quest", budget=64)
    k = m.pages_to_read(block_size)
    assert k == max(m.min_pages, 64 // block_size)  # 4 pages at 16 tokens, min_pages = 3 at 32
    gen = torch.Generator().manual_seed(block_size)
    b, H, nb = 3, 4, 12
    for trial in range(10):
        bounds = torch.randn(b, H, nb, generator=gen)  # random floats: no ties
        num_blocks = torch.randint(0, nb + 1, (b, H), generator=gen)
        num_blocks[0, :4] = torch.tensor([1, k - 1, k, k + 1])  # fewer than k, exactly k, one more
        num_blocks[1, 0] = nb
        if trial % 2:  # as the kernel writes them: -inf past a head's pages
            bounds = bounds.masked_fill(torch.arange(nb) >= num_blocks[..., None], float("-inf"))
        lengths = (num_blocks * block_size - torch.randint(0, block_size, (b, H), generator=gen)).clamp(min=0)
        tables = torch.randperm(200, generator=gen)[:b * H * nb].view(b, H, nb)  # block ids, not page indices
        tables = tables.masked_fill(torch.arange(nb) >= num_blocks[..., None], -1)
        got, got_lengths = reference.quest_pages(bounds, tables, lengths, block_size, k)
        assert got.shape == (b, H, k)  # as wide as the method reads, whatever each head picked
        want = [row[i].tolist() + [-1] * (k - len(i)) for row, i in zip(tables.view(b * H, nb),
                                                                         brute_select(bounds, num_blocks, k))]
        assert got.view(b * H, k).tolist() == want, (trial, num_blocks)
        # whole pages dropped, the newest (partial) one kept
        assert torch.equal(got_lengths, lengths - (num_blocks - num_blocks.clamp(max=k)) * block_size)
