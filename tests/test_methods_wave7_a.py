"""ShadowKV and SpeCache (issue 30, wave 7 group a): offloaders whose device copy of the host keys picks
what a decode step recalls. ShadowKV: hand-made keys where the outlier chunk, the landmark the query
points at, a chunk completed by a decode block and a rank-1 rebuild are known; SpeCache: the packed
codes of known keys, a pick the low-bit copy makes differently from the exact keys, the count of
picks the previous step had made. Both: the engine's greedy tokens over a tiny GQA model equal a
plain restatement; a budget covering the host (at full rank) gives `full`'s tokens; the bytes moved
fall with the budget and the device holds less than `full`; bad options are refused clearly."""

import math

import pytest
import torch

from helpers import DenseOffloaded, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import OffloadView, ReadStep
from nanokv.models.rope import apply_rope, rope_cos_sin

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]
WINDOW = 8


def moved(method, keys, state, layer=0, start=0):
    """Hand keys [H, n, D] moved to the host at `layer` (no RoPE: inv_freq 0) -> their summaries."""
    n = keys.shape[1]
    return method.summarize(OffloadView(layer, keys, keys, torch.arange(start, start + n), state,
                                        inv_freq=torch.zeros(keys.shape[-1] // 2)))


def step_over(summaries, queries, lengths, state, block_size=4):
    """A ReadStep of one sequence at layer 0 over hand summaries {name: [H, S, ...]} (padded with
    zeros to whole pages, as the cache's rows are)."""
    S = next(iter(summaries.values())).shape[1]
    pad = -S % block_size
    summaries = {name: torch.cat([s, torch.zeros(s.shape[0], pad, *s.shape[2:], dtype=s.dtype)], 1)
                 for name, s in summaries.items()}
    return ReadStep(layer=0, num_layers=1, queries=queries, positions=lengths[:, 0], lengths=lengths,
                    block_size=block_size, itemsize=4, states=[state], step_state={},
                    inv_freq=torch.zeros(queries.shape[-1] // 2), pages=-(-S // block_size),
                    fetch=lambda name: {name: summaries[name][None]})


# --- ShadowKV by hand ------------------------------------------------------------------------------

def test_shadowkv_keeps_the_spread_chunk_exact_and_rebuilds_the_chunk_the_query_points_at():
    # 4 chunks of 2 tokens, D = 4. Chunk 1's keys point apart (the smallest cosine to their mean):
    # the outlier. The query points along c3, where chunk 3's landmark is largest.
    e = torch.eye(4)
    keys = torch.stack([e[0], e[0], e[0], e[1], e[2], e[2], 2 * e[3], e[3]])[None]      # [1, 8, 4]
    method = make_method("shadowkv", budget=2, chunk_size=2, outliers=1, rank=4, device_window=0)
    state = {}
    summaries = moved(method, keys, state)
    picks = method.pick(step_over(summaries, e[3][None, None].repeat(1, 2, 1), torch.tensor([[8]]), state))
    assert picks.slots.tolist() == [[[6, 7, 2, 3]]]          # chunk 3 picked, then outlier chunk 1
    assert torch.allclose(picks.keys[0, 0], keys[0, [6, 7, 2, 3]], atol=1e-5)  # full rank: exact
    # landmarks of the 3 scored chunks, the 2 picked coordinate rows and position, the 2 exact keys
    assert int(picks.scored_bytes) == 3 * 4 * 4 + 2 * (4 * 4 + 4) + 2 * 4 * 4


def test_shadowkv_rebuilds_keys_from_a_low_rank_basis_of_the_first_keys_moved():
    # the first keys lie along c0 but one; rank 1 keeps c0, so that one rebuilds as 0, the others whole
    keys = torch.tensor([[3., 0, 0, 0], [-2, 0, 0, 0], [4, 0, 0, 0], [0, 1, 0, 0]])[None]
    method = make_method("shadowkv", budget=4, chunk_size=2, outliers=0, rank=1, device_window=0)
    state = {}
    summaries = moved(method, keys, state)
    assert summaries["coords"].shape == (1, 4, 1)
    picks = method.pick(step_over(summaries, torch.ones(1, 1, 4), torch.tensor([[4]]), state))
    order = picks.slots[0, 0].tolist()
    rebuilt = dict(zip(order, picks.keys[0, 0]))
    assert sorted(order) == [0, 1, 2, 3]
    assert torch.allclose(rebuilt[3], torch.zeros(4), atol=1e-5)
    assert torch.allclose(rebuilt[2], keys[0, 2], atol=1e-5)


def test_shadowkv_a_decode_block_completes_the_chunk_the_prefill_cut():
    # prefill moves 6 tokens (chunks of 4: chunk 1 holds 2 of them, pointing down c1), a decode block
    # 4 more (2 pointing far up c1 finish chunk 1). Chunk 1's landmark then points up c1 (mean 1),
    # above chunk 0's 0.5 and chunk 2's 0.25: the query along c1 reads chunk 1.
    e = torch.eye(4)
    method = make_method("shadowkv", budget=4, chunk_size=4, outliers=0, rank=4, device_window=0)
    state = {}
    first = moved(method, torch.stack([e[0], e[0], e[1], e[1], -e[1], -e[1]])[None], state)
    then = moved(method, torch.stack([3 * e[1], 3 * e[1], 0.25 * e[1] + e[2], 0.25 * e[1] + e[2]])[None], state,
                 start=6)
    summaries = {name: torch.cat([first[name], then[name]], 1) for name in first}
    picks = method.pick(step_over(summaries, e[1][None, None], torch.tensor([[10]]), state))
    assert picks.slots[0, 0].tolist() == [4, 5, 6, 7]
    assert summaries["pos"][0].tolist() == list(range(10))


# --- SpeCache by hand ------------------------------------------------------------------------------

def test_specache_packs_each_tokens_key_in_bits_per_channel():
    method = make_method("specache", budget=4, bits=2)
    s = moved(method, torch.tensor([[[0., 1, 2, 3]]]), {})
    assert s["codes"].tolist() == [[[0 | 1 << 2 | 2 << 4 | 3 << 6]]] and s["codes"].dtype == torch.uint8
    assert s["zero"].tolist() == [[0.0]] and s["scale"].tolist() == [[1.0]]
    one = make_method("specache", budget=4, bits=1)
    s = moved(one, torch.tensor([[[-1., 1, 1, -1, 1, 1, 1, 1]]]), {})
    assert s["codes"].tolist() == [[[2 + 4 + 16 + 32 + 64 + 128]]]
    assert s["zero"].tolist() == [[-1.0]] and s["scale"].tolist() == [[2.0]]


def test_specache_picks_by_the_low_bit_copy_and_counts_what_the_last_step_had_picked():
    # exact q . k: token 0 (0.45) above token 1 (0.44). At 1 bit token 0's c1 rounds to 0 and token
    # 1's to its c0 (0.8): the low-bit copy reads token 1 first, and that is what is recalled.
    keys = torch.zeros(1, 2, 8)
    keys[0, 0, :2] = torch.tensor([1.0, 0.45])
    keys[0, 1, :2] = torch.tensor([0.8, 0.44])
    method = make_method("specache", budget=1, bits=1, device_window=0)
    state = {}
    summaries = moved(method, keys, state)
    q = torch.zeros(1, 2, 8)
    q[0, :, 1] = 1.0
    step = step_over(summaries, q, torch.tensor([[2]]), state)
    picks = method.pick(step)
    assert picks.slots.tolist() == [[[1]]]
    assert int(picks.scored_bytes) == 2 * (1 + 8)      # one byte of codes, a scale and a zero per token
    method.pick(step)
    q[0, :, 1], q[0, :, 0] = 0.0, 1.0                   # now token 0 (1 > 0.8): not picked before
    method.pick(step_over(summaries, q, torch.tensor([[2]]), state))
    counts = state[("specache", 0)]
    assert int(counts["hits"]) == 1 and int(counts["picks"]) == 2


# --- through the engine ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def make(tiny_gqa_dir):
    from nanokv import LLM

    return lambda method="full", budget=None, **kw: LLM(str(tiny_gqa_dir), dtype="float32", method=method,
                                                        budget=budget, **kw)


def greedy(llm, prompts=PROMPTS, steps=20):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def rotated(x, positions, inv_freq):
    """x [n, D] rotated by RoPE at positions [n] (negative: undone)."""
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    return apply_rope(x[:, None], cos, sin)[:, 0]


class RestatedShadowKV(DenseOffloaded):
    """ShadowKV stated plainly, per kv-head: the basis of the prompt's moved pre-RoPE keys, the
    outlier chunks among their whole chunks, landmarks over every host token, the top chunks by the
    group's highest softmax over the other landmarks, read with rebuilt keys; outliers exact."""

    def __init__(self, prompt_len, inv_freq, rank, chunk, outliers, budget):
        super().__init__(prompt_len, WINDOW, 0)
        self.inv_freq, self.rank, self.chunk, self.outliers, self.budget = inv_freq, rank, chunk, outliers, budget

    def decode(self, layer, q, keys, values):
        n, H, D = keys.shape
        group, cs = q.shape[1] // H, self.chunk
        before = n - 1  # the device held the window and a part block after the previous step
        hot = 1 + (before if before < self.window else self.window + (before - self.window) % self.block)
        first = (self.prompt_len - self.window) // self.block * self.block  # what the prefill moved: whole blocks
        host = n - hot
        used, chosen = keys.clone(), []
        for h in range(H):
            k = keys[:, h].float()
            pre = rotated(k, -torch.arange(n), self.inv_freq)
            V = torch.linalg.svd(pre[:first], full_matrices=False).Vh[:self.rank].T
            used[:host, h] = rotated(pre @ V @ V.T, torch.arange(n), self.inv_freq)[:host]
            whole = [k[c * cs:(c + 1) * cs] for c in range(first // cs)]
            worst = torch.stack([torch.cosine_similarity(c, c.mean(0, keepdim=True)).min() for c in whole])
            outliers = set(worst.argsort()[:self.outliers].tolist())
            others = [c for c in range(-(-host // cs)) if c not in outliers]
            landmarks = torch.stack([k[c * cs:min((c + 1) * cs, host)].mean(0) for c in others])
            probs = (q[0, h * group:(h + 1) * group].float() @ landmarks.T / math.sqrt(D)).softmax(-1).amax(0)
            top = [others[i] for i in probs.topk(min(self.budget // cs, len(others))).indices.tolist()]
            for c in outliers:
                used[c * cs:(c + 1) * cs, h] = keys[c * cs:(c + 1) * cs, h]
            picked = [t for c in top + sorted(outliers) for t in range(c * cs, min((c + 1) * cs, host))]
            chosen.append(torch.tensor(sorted(picked + list(range(host, n)))))
        return self.attend(q, used, values, chosen)


def low_bit(keys, bits):
    """Each row of keys [n, D] rounded to 2^bits levels between its smallest and largest channel."""
    low, high = keys.min(-1, keepdim=True).values, keys.max(-1, keepdim=True).values
    step = (high - low) / (2 ** bits - 1)
    return ((keys - low) / step).round() * step + low


def test_shadowkv_reads_as_a_plain_restatement_reads(make):
    llm = make("shadowkv", budget=16, rank=8, chunk_size=4, outliers=2, device_window=WINDOW)
    [got] = greedy(llm, PROMPTS[1:2], 20)  # past a block of decode steps: a block moves to the host
    plain = RestatedShadowKV(len(PROMPTS[1]), llm.model.inv_freq, 8, 4, 2, 16)
    assert got == restated_greedy(llm.model, plain, PROMPTS[1], 20)


@pytest.mark.parametrize("bits", [1, 2])
def test_specache_reads_as_a_plain_restatement_reads(make, bits):
    llm = make("specache", budget=6, bits=bits, device_window=WINDOW)
    [got] = greedy(llm, PROMPTS[1:2], 20)
    plain = DenseOffloaded(len(PROMPTS[1]), WINDOW, 6, lambda q, keys: (q @ low_bit(keys, bits).T).amax(0))
    assert got == restated_greedy(llm.model, plain, PROMPTS[1], 20)


@pytest.fixture(scope="module")
def full_run(make):
    """full's tokens over a short and a long prompt, past a block of decode steps, and the engine."""
    full = make()
    return greedy(full, PROMPTS[::2], 18), full


@pytest.mark.parametrize("method, options", [
    ("shadowkv", dict(rank=32, outliers=1)),   # full rank: every prompt moves at least 32 keys
    ("specache", dict(bits=1)),
])
def test_a_budget_covering_the_host_gives_full_and_a_smaller_one_moves_less(make, full_run, method, options):
    expected, full = full_run
    roomy = make(method, budget=1000, device_window=WINDOW, **options)
    assert greedy(roomy, PROMPTS[::2], 18) == expected
    assert roomy.stats["peak_kv_bytes"] < full.stats["peak_kv_bytes"]
    assert roomy.stats["peak_host_kv_bytes"] > 0
    tight = make(method, budget=8, device_window=WINDOW, **options)
    greedy(tight, PROMPTS[2:], 18)
    greedy(roomy, PROMPTS[2:], 18)
    assert tight.stats["kv_bytes_moved_per_decode_token"] < roomy.stats["kv_bytes_moved_per_decode_token"] / 3


def test_shadowkv_moves_values_alone(make):
    llm = make("shadowkv", budget=8, chunk_size=8, outliers=0, device_window=WINDOW)
    greedy(llm, PROMPTS[:1], 2)
    # one step: 2 kv-heads x 2 layers, one chunk of 8 recalled, value (32 x 4 bytes) and position only
    assert llm.stats["kv_bytes_moved_per_decode_token"] == 2 * 2 * 8 * (32 * 4 + 4)


def test_bad_options_are_refused_clearly():
    with pytest.raises(ValueError, match="rank=0"):
        make_method("shadowkv", budget=64, rank=0)
    with pytest.raises(ValueError, match="budget=4 must be at least chunk_size=8"):
        make_method("shadowkv", budget=4)
    with pytest.raises(ValueError, match="bits=3 .*1 or 2"):
        make_method("specache", budget=64, bits=3)
    with pytest.raises(ValueError, match="give --budget"):
        make_method("specache", compression=0.5)
    with pytest.raises(ValueError, match="head_dim=12 must be a multiple of 8"):
        make_method("specache", bits=1).summary_fields(12)


@pytest.mark.parametrize("method", ["shadowkv", "specache"])
def test_a_prompt_within_the_window_reads_all_of_it_beside_one_on_the_host(make, full_run, method):
    short = list(range(10, 15))  # 5 tokens + 10 steps: never past the window of 8 and a block
    [expected] = greedy(full_run[1], [short], 10)
    got = greedy(make(method, budget=8, device_window=WINDOW), [short, PROMPTS[1]], 10)
    assert got[0] == expected
