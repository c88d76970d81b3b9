"""Sparse prefill (methods/base.py SparsePrefill, kernels/sparse_prefill.py): the block-sparse
Triton kernel against its plain-torch twin under the interpreter (float32, float16; GQA; tiles the
mask skips; a last tile cut short), the twin against dense causal attention when every tile is
kept, the tile pair counts the FLOPs come from, and the engine's hook with made-up methods: every
tile gives full's tokens exactly, only-the-diagonal gives a plain restatement's tokens, a
recompute after preemption repeats, and the FLOPs stats count what the mask computes."""

import math

import pytest
import torch

from helpers import DenseLayers, assert_preemption_repeats, restated_greedy
from nanokv.kernels.reference import attention_by_position, block_sparse_attention, causal_attention, tile_pairs
from nanokv.methods.base import SparsePrefill
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]
TILE = 16


def random_mask(gen, heads, n, keep=0.5):
    mask = torch.rand(heads, n, n, generator=gen) < keep
    return mask | torch.eye(n, dtype=torch.bool)


@pytest.mark.parametrize("T, group, kv_heads, d, tile, dtype", [
    (70, 2, 2, 32, 16, torch.float32),     # a last tile of 6, GQA 2
    (64, 1, 3, 64, 32, torch.float16),     # whole tiles, no GQA, half precision
    (45, 4, 1, 24, 16, torch.float16),     # GQA 4, a head_dim not a power of two
])
def test_kernel_matches_the_twin(T, group, kv_heads, d, tile, dtype, triton_device):
    from nanokv.kernels.sparse_prefill import block_sparse_attention as kernel

    gen = torch.Generator().manual_seed(T + d)
    Hq, n = group * kv_heads, math.ceil(T / tile)
    q, k, v = (torch.randn(T, h, d, generator=gen).to(dtype) for h in (Hq, kv_heads, kv_heads))
    mask = random_mask(gen, Hq, n)
    assert not mask.tril().all(), "the mask should skip some causal tiles"
    got = kernel(*(x.to(triton_device) for x in (q, k, v, mask)), tile).cpu()
    want = block_sparse_attention(q.float(), k.float(), v.float(), mask, tile)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.allclose(got.float(), want, atol={torch.float32: 1e-5, torch.float16: 2e-3}[dtype])
    # a skipped tile matters: the dense answer differs
    assert not torch.allclose(want, causal_attention(q.float(), k.float(), v.float()), atol=1e-3)


def test_twin_with_every_tile_is_dense_causal_attention_and_skips_what_the_mask_drops():
    gen = torch.Generator().manual_seed(0)
    T, Hq, H, D, tile = 37, 4, 2, 8, 8
    q, k, v = torch.randn(T, Hq, D, generator=gen), torch.randn(T, H, D, generator=gen), torch.randn(T, H, D, generator=gen)
    n = math.ceil(T / tile)
    every = torch.ones(Hq, n, n, dtype=torch.bool)
    pos = torch.arange(T)
    assert torch.allclose(block_sparse_attention(q, k, v, every, tile), attention_by_position(q, k, v, pos, pos),
                          atol=1e-6)
    assert torch.allclose(block_sparse_attention(q, k, v, every, tile, chunk=8),
                          block_sparse_attention(q, k, v, every, tile), atol=1e-6)
    # only the diagonal: query t sees the keys of its own tile up to itself, stated plainly
    diagonal = torch.eye(n, dtype=torch.bool).expand(Hq, n, n)
    want = torch.cat([attention_by_position(q[t:t + 1], k[t // tile * tile:t + 1], v[t // tile * tile:t + 1],
                                            pos[t:t + 1], pos[t // tile * tile:t + 1]) for t in range(T)])
    assert torch.allclose(block_sparse_attention(q, k, v, diagonal, tile), want, atol=1e-6)


def test_tile_pairs_count_the_causal_pairs_of_each_tile():
    T, tile = 21, 8
    pairs = tile_pairs(T, tile, "cpu")
    by_hand = torch.zeros(3, 3, dtype=torch.long)
    for q in range(T):
        for key in range(q + 1):
            by_hand[q // tile, key // tile] += 1
    assert torch.equal(pairs, by_hand) and int(pairs.sum()) == T * (T + 1) // 2


class EveryTile(SparsePrefill):
    """Every tile: a sparse prefill that skips nothing."""
    name, description, paper = "every_tile", "test: every tile", ""
    tile_size = TILE

    def prefill_blocks(self, view):
        n = math.ceil(view.queries.shape[0] / self.tile_size)
        return torch.ones(view.queries.shape[1], n, n, dtype=torch.bool, device=view.queries.device)


class OnlyDiagonal(EveryTile):
    """No tile at all but the diagonal, which SparsePrefill.tile_mask always adds."""
    name = "only_diagonal"

    def prefill_blocks(self, view):
        return ~super().prefill_blocks(view)


class DiagonalRestated(DenseLayers):
    """OnlyDiagonal stated plainly: a prompt's query t attends to the keys of its own tile up to itself;
    decode is dense."""

    def dense(self, q, keys, values):
        if len(keys) != len(q):  # not a fresh prompt
            return super().dense(q, keys, values)
        return torch.cat([attention_by_position(q[t:t + 1], keys[t // TILE * TILE:t + 1], values[t // TILE * TILE:t + 1],
                                                self.positions[t:t + 1], torch.arange(t // TILE * TILE, t + 1))
                          for t in range(len(q))])

    def decode(self, layer, q, keys, values):
        return super().dense(q, keys, values)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make(tiny_path, monkeypatch):
    from nanokv import LLM
    from nanokv.methods import METHODS

    for method in (EveryTile, OnlyDiagonal):
        monkeypatch.setitem(METHODS, method.name, method)
    return lambda method="full", **kw: LLM(str(tiny_path), dtype="float32", method=method, **kw)


def greedy(llm, prompts=PROMPTS, steps=8):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def test_every_tile_gives_full_exactly_and_counts_dense_flops(make):
    full = make()
    llm = make("every_tile")
    assert greedy(llm) == greedy(full)
    # 2 layers, 2 query heads of 64: 4 D per causal pair per head, each prompt
    dense = sum(2 * 2 * 4 * 64 * n * (n + 1) // 2 for n in map(len, PROMPTS))
    assert llm.stats["prefill_attention_flops"] == llm.stats["prefill_attention_flops_dense"] == dense
    assert full.stats["prefill_attention_flops"] == full.stats["prefill_attention_flops_dense"] == dense


def test_only_the_diagonal_is_a_plain_restatement_and_computes_fewer_flops(make):
    from nanokv.loading import load_model

    model, _ = load_model("hf_dir", make().source.path, torch.float32)
    llm = make("only_diagonal")
    got = greedy(llm)
    assert got == [restated_greedy(model, DiagonalRestated(), p, 8) for p in PROMPTS]
    assert got != greedy(make())  # the skipped tiles mattered
    computed = sum(2 * 2 * 4 * 64 * int(tile_pairs(n, TILE, "cpu").diagonal().sum()) for n in map(len, PROMPTS))
    assert llm.stats["prefill_attention_flops"] == computed < llm.stats["prefill_attention_flops_dense"]


def test_a_recompute_after_preemption_repeats(make):
    from nanokv import SamplingParams

    # the recompute prefills prompt + generated tokens: the prompt sparse, the generated part dense, as before
    assert_preemption_repeats(lambda **kw: make("only_diagonal", **kw), PROMPTS,
                              SamplingParams(max_tokens=24, ignore_eos=True), blocks=18)


def test_a_sparse_prefill_method_takes_a_budget_not_a_compression(make):
    with pytest.raises(ValueError, match="not --compression=0.5"):
        make("every_tile", compression=0.5)
    assert make("every_tile", budget=64).method.budget == 64
