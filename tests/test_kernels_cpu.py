"""The C++ CPU kernels (nanokv/kernels/cpu_*.cpp) against their plain-torch twins: decode attention
over paged blocks with stale slots past each head's length, KV writes bit for bit, the engine's
greedy tokens, the fallback to plain torch when the kernels cannot be built, the bfloat16
matrix-vector product against F.linear, and RMSNorm and RoPE against the model's torch code."""

import pytest
import torch

from nanokv.kernels import cpu, kernels_for, reference
from test_kernels_decode import paged_inputs, rel_err
from test_kernels_engine import PROMPTS, greedy, tiny_method
from test_kernels_write import _bits, _pools

if not cpu.load():
    pytest.skip("the C++ CPU kernels could not be built here", allow_module_level=True)

CASES = [  # group, d, block_size, dtype, window, lengths [B][Hkv=2]
    (1, 64, 4, torch.float32, None, [[1, 7], [23, 9], [14, 16]]),
    (3, 64, 16, torch.bfloat16, None, [[1, 33], [340, 17]]),     # SmolLM2's heads: the unrolled copy
    (4, 128, 16, torch.float16, 7, [[45, 3], [1, 1], [18, 30]]),
    (7, 80, 8, torch.bfloat16, 5, [[13, 1], [25, 11]]),          # a head size with no unrolled copy
    (8, 128, 4, torch.float32, 3, [[30, 1], [6, 19]]),
    (2, 64, 16, torch.float32, 300, [[1000, 700]]),              # one sequence: splits, some masked whole
]


@pytest.mark.parametrize("group,d,block_size,dtype,window,lengths", CASES)
def test_paged_decode_matches_reference(group, d, block_size, dtype, window, lengths):
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = paged_inputs(0, lengths, group, d, block_size, dtype)
    got = cpu.paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window)
    # the twin in float32: the kernel computes in float32 and rounds once, at the end
    exact = reference.paged_attention(q[:, None].float(), q_pos[:, None], k_pool.float(), v_pool.float(), pos_pool,
                                      tables, lengths, window)[:, 0]
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_err(got, exact) < (1e-5 if dtype == torch.float32 else 1e-2)
    # and the twin in the storage dtype, as the engine runs it, agrees to its own rounding
    twin = reference.paged_attention(q[:, None], q_pos[:, None], k_pool, v_pool, pos_pool, tables, lengths,
                                     window)[:, 0]
    assert rel_err(got, twin) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("group,d,block_size,dtype,window,lengths", CASES)
def test_paged_decode_returns_the_reference_probabilities(group, d, block_size, dtype, window, lengths):
    """H2O and TOVA score with these: [B, Hkv, group, nb * block_size] float32 slot by slot of each
    head's table, 0 where masked or past the head's length, as reference.paged_attention returns them."""
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = paged_inputs(0, lengths, group, d, block_size, dtype)
    out, probs = cpu.paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window, return_probs=True)
    assert torch.equal(out, cpu.paged_decode(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window))
    # scores and softmax are float32 in the twin whatever the storage dtype: bfloat16 only moves the dot's order
    _, want = reference.paged_attention(q[:, None], q_pos[:, None], k_pool, v_pool, pos_pool, tables, lengths,
                                        window, return_probs=True)
    want = want[:, :, :, 0]
    assert probs.dtype == torch.float32 and probs.shape == want.shape
    assert rel_err(probs, want) < (1e-5 if dtype == torch.float32 else 1e-4)
    assert torch.equal(probs == 0, want == 0)  # the same slots masked, the padding and stale slots included
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_a_query_that_sees_no_key_gets_zeros_not_nan():
    q, q_pos, k_pool, v_pool, pos_pool, tables, lengths = paged_inputs(1, [[5, 9]], 2, 64, 4, torch.float32)
    got = cpu.paged_decode(q, q_pos - 1000, k_pool, v_pool, pos_pool, tables, lengths, None)  # all keys in the future
    assert torch.equal(got, torch.zeros_like(got))
    got, probs = cpu.paged_decode(q, q_pos - 1000, k_pool, v_pool, pos_pool, tables, lengths, None, True)
    assert torch.equal(got, torch.zeros_like(got)) and torch.equal(probs, torch.zeros_like(probs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,T", [(1, 1), (3, 5), (8, 37)])
def test_write_kv_matches_reference_bit_for_bit(dtype, H, T):
    gen = torch.Generator().manual_seed(H * 100 + T)
    num_blocks, D = 24, 64
    slots = torch.randperm(num_blocks * 16, generator=gen)[:H * T].view(H, T)
    k, v = torch.randn(T, H, D, generator=gen), torch.randn(T, H, D, generator=gen)  # float32 in, cast as stored
    positions = torch.randint(0, 1000, (T,), generator=gen)
    want, got = _pools(num_blocks, D, dtype), _pools(num_blocks, D, dtype)
    reference.write_kv(*want, slots, k, v, positions)
    cpu.write_kv(*got, slots, k, v, positions)
    for w, g in zip(want, got):
        assert torch.equal(_bits(w), _bits(g))


def test_write_kv_into_strided_pools():
    """A quantized pool's full-precision fields are views into wider rows."""
    rows = torch.full((6, 16, 3 * 32), float("nan"))
    k_pool, v_pool = rows[:, :, :32], rows[:, :, 32:64]
    pos_rows = torch.full((6, 2, 16), -1, dtype=torch.int32)
    pos_pool = pos_rows[:, 0]
    slots = torch.tensor([[3, 40, 77]])
    k, v, positions = torch.randn(3, 1, 32), torch.randn(3, 1, 32), torch.tensor([7, 8, 9])
    cpu.write_kv(k_pool, v_pool, pos_pool, slots, k, v, positions)
    flat = slots[0]
    assert torch.equal(k_pool.reshape(-1, 32)[flat], k[:, 0]) and torch.equal(v_pool.reshape(-1, 32)[flat], v[:, 0])
    assert torch.equal(pos_pool.reshape(-1)[flat], positions.int())
    assert rows[:, :, 64:].isnan().all() and (pos_rows[:, 1] == -1).all()  # nothing past the views


@pytest.mark.parametrize("method", [None, "h2o", "tova", "kivi", "quest"])
def test_cpu_kernels_give_the_reference_greedy_tokens(tiny, method):
    model, cfg = tiny
    expected = greedy(model, cfg, PROMPTS, "reference", method=tiny_method(method))
    assert greedy(model, cfg, PROMPTS, "cpu", method=tiny_method(method)) == expected


def test_without_a_compiler_the_plain_torch_kernels_serve(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))   # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built, using plain torch"):
            chosen = kernels_for("cpu", "cpu")
        assert chosen.name == "reference"
    finally:
        monkeypatch.undo()
        cpu.load.cache_clear()
    assert kernels_for("cpu").name == "cpu"  # the build in the usual place again


@pytest.mark.skipif(not cpu.gemv_available(), reason="the matrix-vector kernel needs AVX512-BF16")
@pytest.mark.parametrize("M,K,N,bias", [(1, 576, 960, False), (3, 64, 37, True), (4, 1536, 576, False)])
def test_gemv_matches_linear_to_the_last_bfloat16_bit(M, K, N, bias):
    gen = torch.Generator().manual_seed(M * K + N)
    x, w = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(N, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16() if bias else None
    got, want = cpu.gemv(x, w, b), torch.nn.functional.linear(x, w, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    ulp = want.float().abs().clamp(min=1e-3) * 2 ** -7  # one bfloat16 step at each output's scale
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 1.5 + 1e-6


@pytest.mark.skipif(not cpu.gemv_available(), reason="the matrix-vector kernel needs AVX512-BF16")
def test_packed_linear_sends_a_few_rows_through_gemv(monkeypatch):
    from nanokv.models import cpu_linear

    linear = torch.nn.Linear(64, 48, bias=False).bfloat16()
    packed = cpu_linear.PackedLinear(linear, keep_rows=True)
    calls, gemv = [], cpu.gemv
    monkeypatch.setattr(cpu_linear.cpu, "gemv", lambda *args: calls.append(args[0].shape[0]) or gemv(*args))
    for rows in (1, cpu_linear.GEMV_MAX_ROWS, cpu_linear.GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.allclose(packed(x).float(), linear(x).float(), rtol=1e-2, atol=1e-2)
    assert calls == [1, cpu_linear.GEMV_MAX_ROWS]  # more rows than that: oneDNN's packed weight
    assert cpu_linear.PackedLinear(linear).rows is None  # no second copy unless asked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,heads", [(1, 9), (5, 3), (70, 2)])
def test_rope_matches_the_plain_torch_rope_bit_for_bit(monkeypatch, dtype, T, heads):
    from nanokv.models import rope

    gen = torch.Generator().manual_seed(T * heads)
    x = (torch.randn(T, heads, 64, generator=gen) * 4).to(dtype)
    cos, sin = rope.rope_cos_sin(torch.randint(0, 4000, (T,), generator=gen), rope.inverse_frequencies(64, 1e4, {}),
                                 dtype)
    got = rope.apply_rope(x, cos, sin)
    monkeypatch.setattr(cpu, "serves", lambda *tensors: False)  # the twin: nanokv/models/rope.py in torch
    want = rope.apply_rope(x, cos, sin)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 960), (70, 3, 64)])
def test_rms_norm_matches_the_plain_torch_norm(monkeypatch, dtype, shape):
    from nanokv.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(len(shape) * shape[-1])
    norm = RMSNorm(shape[-1], 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    calls, rms_norm = [], cpu.rms_norm
    monkeypatch.setattr(cpu, "rms_norm", lambda *args: calls.append(1) or rms_norm(*args))
    assert norm(x).grad_fn is not None and calls == []  # a gradient wanted: torch's ops, which have one
    with torch.no_grad():
        got = norm(x)
        monkeypatch.setattr(cpu, "serves", lambda *tensors: False)
        want = norm(x)
    assert calls == [1] and got.dtype == dtype and got.shape == x.shape
    # the mean of squares is summed in another order and torch's rsqrt rounds its own way: float32
    # may move in the last bits, and bfloat16, rounded after that, by one step at most
    step = want.float().abs().clamp(min=1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -21)
    assert ((got.float() - want.float()).abs() <= step).all()


@pytest.mark.parametrize("method", ["h2o", "tova"])
def test_an_evicting_method_decodes_through_the_cpp_kernel(tiny, monkeypatch, method):
    """Its probabilities come from the C++ decode, not the plain-torch twin (4x slower on CPU)."""
    model, cfg = tiny
    asked, paged_decode = [], cpu.paged_decode
    monkeypatch.setattr(cpu, "paged_decode", lambda *args: asked.append(args[-1]) or paged_decode(*args))
    greedy(model, cfg, PROMPTS[:2], "cpu", steps=3, method=tiny_method(method))
    assert asked and all(asked)  # every decode call wanted the probabilities


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
def test_page_scores_match_reference(dtype, group):
    from test_kernels_quest import strided_bounds

    gen = torch.Generator().manual_seed(group)
    B, Hkv, nb, D = 2, 2, 37, 64
    q = torch.randn(B, Hkv * group, D, generator=gen).to(dtype)
    kmin, kmax = strided_bounds(gen, 60, D, dtype)
    tables = torch.randint(1, 60, (B, Hkv, nb), generator=gen)
    tables[0, 0, 30:] = -1
    tables[1, 1, :] = -1
    got, want = cpu.page_scores(q, kmin, kmax, tables), reference.page_scores(q, kmin, kmax, tables)
    held = tables >= 0
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, nb)
    torch.testing.assert_close(got[held], want[held], rtol=1e-5, atol=1e-5 * D ** 0.5)  # float32 sums, in any order
    assert torch.isneginf(got[~held]).all()


@pytest.mark.parametrize("block_size,budget,group", [(16, 64, 3), (4, 8, 1), (16, 256, 3), (8, 24, 2)])
def test_quest_select_picks_what_the_torch_path_picks(block_size, budget, group):
    """cpu.quest_select against the engine's plain-torch path (reference.page_scores, then
    reference.quest_pages): the same tables, as wide, and lengths."""
    from nanokv.methods import make_method

    quest = make_method("quest", budget=budget)
    gen = torch.Generator().manual_seed(block_size * budget)
    B, Hkv, D, N = 5, 3, 64, 800
    for dtype in (torch.float32, torch.bfloat16):
        keys = torch.randn(N, block_size, D, generator=gen)
        kmin, kmax = keys.amin(1).to(dtype), keys.amax(1).to(dtype)
        for trial in range(5):
            lengths = torch.randint(0, 40 * block_size, (B, Hkv), generator=gen)
            lengths[0] = torch.tensor([1, block_size, block_size * 3 + 1])  # one page; a full one; a few
            nb = int(((lengths + block_size - 1) // block_size).max()) + trial  # tables wider than needed too
            tables = torch.randperm(N, generator=gen)[:B * Hkv * nb].view(B, Hkv, nb)
            tables = tables.masked_fill(torch.arange(nb) * block_size >= lengths[..., None], -1)
            q = torch.randn(B, Hkv * group, D, generator=gen).to(dtype)
            pages = quest.pages_to_read(block_size)
            want_tables, want_lengths = reference.quest_pages(reference.page_scores(q, kmin, kmax, tables), tables,
                                                              lengths, block_size, pages)
            got_tables, got_lengths = cpu.quest_select(q, kmin, kmax, tables, lengths, block_size, pages)
            assert torch.equal(got_tables, want_tables), (dtype, trial)
            assert torch.equal(got_lengths, want_lengths), (dtype, trial)


def test_quest_decodes_the_whole_batch_in_one_call(tiny, monkeypatch):
    """Over the C++ kernels Quest's decode is one quest_select and one decode per layer (no length
    groups), and its greedy tokens are the reference kernels' (as test_cpu_kernels_give_the_reference_greedy_tokens)."""
    import dataclasses

    import nanokv.kernels as kernels_module

    model, cfg = tiny
    method = tiny_method("quest")
    prompts = [[(i * 31 + j * 7) % 256 for j in range(n)] for i, n in enumerate((3, 60, 9, 41, 120))]
    expected = greedy(model, cfg, prompts, "reference", method=method, steps=10)
    calls = {"quest_select": 0, "decode": 0}
    made = kernels_module.cpu_kernels

    def counting(*args, **kwargs):
        k = made(*args, **kwargs)

        def count(name, fn):
            def wrapped(*a, **kw):
                calls[name] += 1
                return fn(*a, **kw)
            return wrapped
        return dataclasses.replace(k, quest_select=count("quest_select", k.quest_select),
                                   decode=count("decode", k.decode))

    monkeypatch.setattr(kernels_module, "cpu_kernels", counting)
    assert greedy(model, cfg, prompts, "cpu", method=method, steps=10) == expected
    assert calls["quest_select"] > 0 and calls["decode"] == calls["quest_select"]  # skip_layers=0: every layer
