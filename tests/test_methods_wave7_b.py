"""MagicPIG and RetrievalAttention (issue 30, wave 7 group b): two Offloaders over the host tier.
MagicPIG: table codes and the sampled chance against the binomial tail written out, the pick on
hand-made hyperplanes (who collides, the group's union, sinks, the cap, the weights 1 / p), the
dense middle layer, the options; the engine's tokens against a plain restatement (collisions
counted sign by sign, the weights in a plain softmax), every key sampled gives `full`'s tokens,
bytes. RetrievalAttention: the query-projected links and the beam search on hand-built graphs, the
pick over an index that summarize grew (sinks, the cap, keys visited), the options; the engine's
tokens against exact top-k (a beam that covers the graph), the graph covering every host token,
a budget covering the cache gives `full`'s tokens, bytes."""

import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import DenseOffloaded, keep_released_states, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import OffloadView, ReadStep
from nanokv.methods.hashevict import hyperplanes
from nanokv.methods.magicpig import log_sampled_chance, table_codes
from nanokv.methods.retrievalattention import beam_search, linked_neighbours
from tiny_model import save_tiny_llama

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]
WINDOW = 8


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-w7b"))


@pytest.fixture
def make(tiny_path):
    from nanokv import LLM

    return lambda method="full", budget=None, **kw: LLM(str(tiny_path), dtype="float32", method=method,
                                                        budget=budget, **kw)


def greedy(llm, prompts=PROMPTS, steps=16):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def offload_step(queries, lengths, fetch, slots, layer=0, num_layers=1, states=None):
    """A ReadStep of one Offloader layer over hand-made host fields (`fetch(name) -> {name: ...}`)."""
    b = lengths.shape[0]
    return ReadStep(layer=layer, num_layers=num_layers, queries=queries, positions=lengths[:, 0] + WINDOW,
                    lengths=lengths, block_size=1, itemsize=4, states=states or [{} for _ in range(b)],
                    step_state={}, fetch=fetch, pages=slots)


# --- MagicPIG: hashing and the sampled chance ---------------------------------------------------

def binomial_tail(cos, bits, tables, least):
    """P(Binomial(tables, u^bits) >= least), u = 1 - arccos(cos) / pi, written out, + 1e-4 (the official smoothing)."""
    one = (1 - math.acos(cos) / math.pi) ** bits
    return sum(math.comb(tables, j) * one ** j * (1 - one) ** (tables - j) for j in range(least, tables + 1)) + 1e-4


@pytest.mark.parametrize("cos, bits, tables, least", [(0.9, 10, 150, 2), (0.5, 4, 16, 2), (0.2, 3, 20, 3),
                                                      (0.99, 10, 150, 2)])
def test_the_sampled_chance_is_the_binomial_tail_of_the_per_table_collision(cos, bits, tables, least):
    got = float(log_sampled_chance(torch.tensor([cos]), bits, tables, least)[0])
    assert got == pytest.approx(math.log(binomial_tail(cos, bits, tables, least)), rel=1e-4, abs=1e-5)
    assert float(log_sampled_chance(torch.tensor([cos]), bits, tables, 0)[0]) == 0.0  # every key: p = 1


@pytest.mark.parametrize("bits, tables, least", [(10, 150, 2), (3, 20, 3), (10, 150, 75), (10, 150, 76), (2, 4, 3)])
def test_the_sampled_chance_holds_from_opposite_to_equal_both_below_and_above_half_the_tables(bits, tables, least):
    """Up to half the tables the chance is one minus the terms below the tail (float64), above it
    the tail itself: both agree with the sum written out at every angle, the ends included."""
    cos = torch.linspace(-1, 1, 201)
    got = log_sampled_chance(cos, bits, tables, least)
    want = [math.log(binomial_tail(max(-1.0, min(1.0, float(c))), bits, tables, least)) for c in cos.double()]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=2e-5)


def test_a_tables_code_is_the_signs_on_its_own_hyperplanes():
    planes = torch.eye(4)                                       # K = 2, L = 2: table 0 reads c0, c1; table 1 c2, c3
    x = torch.tensor([[1.0, -1.0, -1.0, 1.0], [-1.0, 1.0, 1.0, 1.0]])
    assert table_codes(x, planes, 2).tolist() == [[1, 2], [2, 3]]


# --- MagicPIG: the pick -----------------------------------------------------------------------

def magicpig_step(method, keys, queries, layer=0, num_layers=4):
    """keys [S, D] of one kv-head (all held), queries [Hq, D]: codes summarized by the method itself."""
    S, D = keys.shape
    state = {}
    codes = method.summarize(OffloadView(layer, keys[None], keys[None], torch.arange(S), state))["codes"]
    fetch = lambda name: {"codes": codes[None]} if name == "codes" else {"keys": keys[None, None],
                                                                        "key_positions": None}
    return offload_step(queries[None], torch.tensor([[S]]), fetch, S, layer, num_layers, [state])


def hand_planes(method):
    method.planes = lambda layer, head_dim, device: torch.eye(4, device=device)  # bits 2, tables 2
    return method


def test_magicpig_samples_keys_sharing_two_buckets_with_any_query_head_weighed_by_one_over_p():
    m = hand_planes(make_method("magicpig", budget=100, bits=2, tables=2, sinks=1, device_window=8, dense_every=0))
    ones = torch.ones(4)
    keys = torch.stack([-ones,                                   # 0: a sink, shares no bucket
                        torch.tensor([1.0, 1.0, -1.0, -1.0]),    # 1: one table (table 0) only
                        torch.tensor([1.0, 1.0, 1.0, 0.5]),      # 2: both tables with head 0
                        -ones * 2,                               # 3: both tables with head 1
                        torch.tensor([-1.0, 1.0, 1.0, -1.0]),    # 4: none
                        torch.tensor([3.0, -1.0, 3.0, -1.0]),    # 5, 6: none, and the keys' mean is 0
                        torch.tensor([-1.0, 1.0, -1.0, 5.5])])
    q = torch.stack([ones, -ones])                               # one kv-head, its 2 query heads
    picks = m.pick(magicpig_step(m, keys, q))
    chosen = picks.slots[0, 0].tolist()
    assert sorted(s for s in chosen if s >= 0) == [0, 2, 3] and chosen[0] == 0   # the sink first
    weights = dict(zip(chosen, picks.log_weights[0, 0].tolist()))
    assert weights[0] == 0.0                                                      # sinks are exact
    assert weights[3] == pytest.approx(-math.log(1 + 1e-4), abs=1e-6)             # cos 1 to head 1: p = 1
    cos = 3.5 / (2 * math.sqrt(3.25))                                             # key 2 to head 0
    assert weights[2] == pytest.approx(-math.log(binomial_tail(cos, 2, 2, 2)), rel=1e-4)
    assert int(picks.scored_bytes) == 7 * 2 * 2 + 3 * 4 * 4                       # codes, then sampled keys
    # keys hashed less their mean: shifted by one vector, they are sampled and weighed alike
    shifted = m.pick(magicpig_step(m, keys + torch.tensor([5.0, -3.0, 4.0, 9.0]), q))
    assert torch.equal(shifted.slots, picks.slots) and torch.allclose(shifted.log_weights, picks.log_weights)


def test_magicpig_caps_what_it_recalls_at_the_budget_most_collisions_first():
    m = hand_planes(make_method("magicpig", budget=10, bits=2, tables=2, sinks=0, device_window=8,
                                min_collisions=1, dense_every=0))
    keys = torch.stack([torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor([-1.0, 1.0, -1.0, -1.0]),
                        torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.tensor([-1.0, -1.0, 1.0, 1.0])])
    q = torch.ones(2, 4)
    picks = m.pick(magicpig_step(m, keys, q))  # 10 - 8 = 2 slots: key 2 (2 tables), then key 0 or 3 (1 each)
    chosen = picks.slots[0, 0].tolist()
    assert chosen[0] == 2 and chosen[1] in (0, 3) and len(chosen) == 2


@pytest.mark.parametrize("tables", [150, 300])  # a count in a byte, and past what a byte holds
def test_magicpig_recalls_the_keys_of_most_collisions_counted_past_a_byte(tables):
    m = make_method("magicpig", budget=8 + 5, bits=2, tables=tables, sinks=0, device_window=8,
                    min_collisions=1, dense_every=0)
    torch.manual_seed(0)
    q = torch.randn(1, 16)
    near = torch.cat([q + 0.2 * k * torch.randn(12, 16) for k in range(1, 5)])    # near the query, then farther
    keys = torch.cat([near, -near])                                                # centred: their mean is 0
    picks = m.pick(magicpig_step(m, keys, q))
    # each key's collisions counted here table by table in int64
    planes = m.planes(0, 16, keys.device)
    counts = (table_codes(keys, planes, 2).long() == table_codes(q, planes, 2).long()).sum(-1)
    assert counts.max() > 255 if tables == 300 else counts.max() <= 150
    chosen = picks.slots[0, 0]
    assert sorted(counts[chosen].tolist()) == sorted(counts.topk(5).values.tolist())


def test_magicpig_reads_every_host_token_of_its_dense_layers_unweighed():
    m = make_method("magicpig", budget=100, device_window=8, dense_every=2)
    keys = torch.randn(6, 4)
    picks = m.pick(magicpig_step(m, keys, torch.randn(2, 4), layer=2, num_layers=4))
    assert picks.slots[0, 0].tolist() == list(range(6)) and picks.log_weights is None
    for layer in (1, 3):
        assert m.pick(magicpig_step(m, keys, torch.randn(2, 4), layer=layer, num_layers=4)).log_weights is not None
    off = make_method("magicpig", budget=100, device_window=8, bits=2, tables=2, dense_every=0)
    assert off.pick(magicpig_step(off, keys, torch.randn(2, 4), layer=2, num_layers=4)).log_weights is not None


@pytest.mark.parametrize("options, match", [
    ({"bits": 16}, r"bits=16 .* 1\.\.15"), ({"tables": 0}, "tables=0"), ({"min_collisions": -1}, "min_collisions=-1"),
    ({"tables": 3, "min_collisions": 4}, "min_collisions=4 .* at most tables=3"), ({"sinks": -2}, "sinks=-2"),
    ({"dense_every": -1}, "dense_every=-1"),
])
def test_magicpig_refuses_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_method("magicpig", budget=100, **options)


# --- MagicPIG through the engine --------------------------------------------------------------

class MagicPIGTwin(DenseOffloaded):
    """MagicPIG stated plainly: each older key shares a table with a query head when all its K signs
    match, keys centred on the mean of the prompt's moved keys; sampled at >= `least` tables with any
    query head (or a sink), weighed log(1 / p), p the written-out binomial tail at the best query
    head's angle to the centred key; one plain softmax with the window."""

    def __init__(self, prompt_len, bits, tables, least, sinks):
        super().__init__(prompt_len, WINDOW, 0)
        self.bits, self.tables, self.least, self.sinks = bits, tables, least, sinks

    def decode(self, layer, q, keys, values):
        n, H, D = keys.shape
        before = n - 1  # the device held the window and a part block after the previous step
        hot = 1 + (before if before < self.window else self.window + (before - self.window) % self.block)
        planes = hyperplanes(0, layer, D, self.tables * self.bits, "cpu")
        group = q.shape[1] // H
        outs = []
        for h in range(H):
            qh = q[0, h * group:(h + 1) * group].float()
            signs_q = (qh @ planes >= 0).view(group, self.tables, self.bits)
            mean = keys[:(self.prompt_len - self.window) // self.block * self.block, h].float().mean(0)  # the prefill's move
            index, bias = [], []
            for j in range(n):
                k = keys[j, h].float() - mean
                if j >= n - hot or j < self.sinks:
                    index.append(j), bias.append(0.0)
                    continue
                signs_k = (k @ planes >= 0).view(self.tables, self.bits)
                shared = [sum(bool((signs_q[g, t] == signs_k[t]).all()) for t in range(self.tables)) for g in range(group)]
                if max(shared) >= self.least:
                    cos = [float(qh[g] @ k / (qh[g].norm() * k.norm())) for g in range(group)]
                    p = max(binomial_tail(max(-1.0, min(1.0, c)), self.bits, self.tables, self.least) for c in cos)
                    index.append(j), bias.append(-math.log(p))
            index = torch.tensor(index)
            logits = (qh @ keys[index, h].float().T) / math.sqrt(D) + torch.tensor(bias)
            outs.append((logits.softmax(-1) @ values[index, h].float())[None].to(q.dtype))
        return torch.cat(outs, dim=1)


def test_magicpig_tokens_equal_a_plain_restatement_and_sampling_changes_them(make):
    options = dict(bits=3, tables=12, min_collisions=2, sinks=4, device_window=WINDOW, skip_layers=0,
                   dense_every=0)
    llm = make("magicpig", budget=1000, **options)
    [got] = greedy(llm, PROMPTS[1:2], 20)  # past a block of decode steps: a block moves to the host
    twin = MagicPIGTwin(len(PROMPTS[1]), 3, 12, 2, 4)
    assert got == restated_greedy(llm.model, twin, PROMPTS[1], 20)
    assert got != greedy(make(), PROMPTS[1:2], 20)[0]  # the sample is not the whole cache


def test_magicpig_with_grouped_heads_samples_the_groups_union(tiny_gqa_dir):
    from nanokv import LLM

    llm = LLM(str(tiny_gqa_dir), dtype="float32", method="magicpig", budget=1000, bits=3, tables=12, sinks=4,
              device_window=WINDOW, skip_layers=0, dense_every=0)
    [got] = greedy(llm, PROMPTS[0:1], 12)
    assert got == restated_greedy(llm.model, MagicPIGTwin(len(PROMPTS[0]), 3, 12, 2, 4), PROMPTS[0], 12)


def test_magicpig_sampling_every_key_gives_full_and_bytes_fall_with_the_budget(make):
    full = make()
    expected = greedy(full)
    full_peak = full.stats["peak_kv_bytes"]
    every = make("magicpig", budget=1000, min_collisions=0, device_window=WINDOW, skip_layers=0, dense_every=0)
    assert greedy(every) == expected
    # a prompt within the window moves nothing at prefill, beside ones that do
    assert greedy(make("magicpig", budget=1000, device_window=WINDOW, skip_layers=0, dense_every=0),
                  [PROMPTS[0], [7, 8, 9]], 4)[1] == greedy(full, [[7, 8, 9]], 4)[0]
    greedy(every)
    assert every.stats["peak_kv_bytes"] < full_peak
    moved = []
    for budget in (1000, 24, 12):
        llm = make("magicpig", budget=budget, min_collisions=0, device_window=WINDOW, skip_layers=0, dense_every=0)
        greedy(llm, PROMPTS[2:])
        moved.append(llm.stats["kv_bytes_moved_per_decode_token"])
    assert moved[0] > moved[1] > moved[2] > 0
    sampled = make("magicpig", budget=1000, bits=4, tables=16, device_window=WINDOW, skip_layers=0, dense_every=0)
    greedy(sampled, PROMPTS[2:])
    assert sampled.stats["kv_bytes_moved_per_decode_token"] < moved[0]  # collisions sample fewer than all


# --- RetrievalAttention: the index -------------------------------------------------------------

def test_each_prefill_query_links_its_nearest_key_with_the_others_most_links_first():
    keys = torch.eye(3)
    queries = torch.tensor([[1.0, 0.5, 0.2], [1.0, 0.2, 0.5], [1.0, 0.2, 0.6]])  # nearest 2: {0, 1}, {0, 2} twice
    assert linked_neighbours(keys, queries, 2).tolist() == [[2, 1], [0, -1], [0, -1]]
    # four keys, two distant query clusters: two components (the chain joins them in the search)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    queries = torch.tensor([[1.0, 0.5], [-1.0, -0.5]])
    assert linked_neighbours(keys, queries, 2).tolist() == [[1, -1], [0, -1], [3, -1], [2, -1]]


def search(neighbours, keys, q, entry, beam):
    """beam_search of one graph."""
    score, seen = beam_search(neighbours[None], keys[None], q[None], torch.tensor([entry]), beam,
                              torch.tensor([len(keys)]))
    return score[0], int(seen[0])


def test_the_beam_search_walks_the_links_and_a_narrow_beam_stops_at_a_local_best():
    keys = torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0, 9.0, 4.0])[:, None]             # q . k along a chain
    q = torch.ones(1, 1)
    chain = torch.full((7, 1), -1)
    score, seen = search(chain, keys, q, 0, 1)
    assert int(score.argmax()) == 1 and seen == 3                                  # stuck at slot 1 (3)
    assert int(search(chain, keys, q, 0, 7)[0].argmax()) == 5                      # a wide beam walks on
    linked = chain.clone()
    linked[0, 0] = 5
    score, seen = search(linked, keys, q, 0, 1)                                    # a link jumps to 5
    assert int(score.argmax()) == 5 and seen == 5                                  # 0, 1, 5, then 4 and 6


def test_searches_run_together_find_what_each_finds_alone():
    """One batched search per kv-head of each sequence: graphs of different lengths (padded with
    keys no link reaches) and an empty one give each search what it gives alone."""
    torch.manual_seed(0)
    lengths = [40, 25, 0, 33]
    keys, q = torch.randn(4, 40, 8), torch.randn(4, 2, 8)
    neighbours = torch.full((4, 40, 3), -1)
    for p, n in enumerate(lengths):
        if n:
            neighbours[p, :n] = linked_neighbours(keys[p, :n], torch.randn(3 * n, 8), 3)
    entry = torch.tensor([5, 0, 0, 32])
    score, seen = beam_search(neighbours, keys, q, entry, 4, torch.tensor(lengths))
    for p, n in enumerate(lengths):
        if n == 0:
            assert int(seen[p]) == 0 and bool((score[p] == float("-inf")).all())
            continue
        alone, alone_seen = search(neighbours[p, :n], keys[p, :n], q[p], int(entry[p]), 4)
        assert torch.equal(score[p, :n], alone) and int(seen[p]) == alone_seen
        assert 4 < alone_seen < n and bool((score[p, n:] == float("-inf")).all())  # a search, not a scan


def retrieval_step(method, keys, layer=0, state=None):
    """keys [S, D] of one kv-head in host memory, the index `state` summarize grew."""
    S = keys.shape[0]
    fetch = lambda name: {"keys": keys[None, None], "key_positions": None}
    return lambda q: offload_step(q[None], torch.tensor([[S]]), fetch, S, layer, 1, [state])


def test_retrievalattention_recalls_its_sinks_and_the_best_keys_its_search_finds():
    torch.manual_seed(0)
    m = make_method("retrievalattention", budget=8 + 2 + 3, sinks=2, device_window=8, degree=4, beam=16)
    keys = torch.randn(24, 4)
    queries = torch.randn(24, 2, 4)
    state = {}
    m.summarize(OffloadView(0, keys[None, :16], keys[None, :16], torch.arange(16), state, queries=queries[:16]))
    m.summarize(OffloadView(0, keys[None, 16:], keys[None, 16:], torch.arange(16, 24), state))  # a decode block
    assert m.graph(state, 0, 0).shape == (24, 4) and int(m.graph(state, 0, 0)[16:].min()) >= -1
    assert int(m.graph(state, 0, 0)[16:].max()) >= 16 and int(m.graph(state, 0, 0)[:16].max()) < 16
    # the prompt's part is linked by its queries (both heads of the group), not by its keys
    by_queries = linked_neighbours(keys[:16], queries[:16].flatten(0, 1), 4)
    assert torch.equal(m.graph(state, 0, 0)[:16], by_queries)
    assert not torch.equal(by_queries, linked_neighbours(keys[:16], keys[:16], 4))
    q = torch.randn(2, 4)
    picks = m.pick(retrieval_step(m, keys, state=state)(q))
    chosen = picks.slots[0, 0].tolist()
    exact = (q @ keys[2:].T).amax(0).topk(3).indices + 2                            # a beam of 16 over 24: exact here
    assert chosen[:2] == [0, 1] and sorted(chosen[2:]) == sorted(exact.tolist())
    assert 0 < int(picks.scored_bytes) <= 24 * 4 * 4 and int(picks.scored_bytes) % (4 * 4) == 0


def test_retrievalattention_starts_its_search_at_the_key_most_linked_to():
    # the chain of the beam search test: from slot 0 a beam of 1 stops at slot 1 (3); slots 2 and 6
    # link to slot 4 (5), the key most linked to, and from there it climbs to slot 5 (9)
    m = make_method("retrievalattention", budget=1, sinks=0, device_window=0, degree=2, beam=1)
    keys = torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0, 9.0, 4.0])[:, None]
    graph = torch.full((7, 2), -1)
    graph[2, 0] = graph[6, 0] = 4
    picks = m.pick(retrieval_step(m, keys, state={"retrievalattention": {0: [[graph]]}})(torch.ones(1, 1)))
    assert picks.slots[0, 0].tolist() == [5]


@pytest.mark.parametrize("options, match", [
    ({"budget": 600, "device_window": 512, "sinks": 128}, "budget=600 .* must exceed device_window \\+ sinks = 640"),
    ({"budget": 100, "degree": 1}, "degree=1"), ({"budget": 100, "beam": 0}, "beam=0"),
    ({"budget": 100, "sinks": -1}, "sinks=-1"),
])
def test_retrievalattention_refuses_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_method("retrievalattention", **options)


# --- RetrievalAttention through the engine -----------------------------------------------------

class SinksAndTop(DenseOffloaded):
    """The first `sinks` older tokens and the k of highest q . k (the best query head) of the rest."""

    def __init__(self, prompt_len, k, sinks):
        super().__init__(prompt_len, WINDOW, k)
        self.sinks = sinks

    def older(self, layer, h, q, keys):
        sinks = torch.arange(min(self.sinks, len(keys)))
        rest = (q @ keys[self.sinks:].T).amax(0)
        return torch.cat([sinks, rest.topk(min(self.k, len(rest))).indices + self.sinks])


def test_retrievalattention_with_a_beam_over_the_graph_reads_the_exact_top_k(make):
    llm = make("retrievalattention", budget=WINDOW + 2 + 5, sinks=2, degree=4, beam=200, device_window=WINDOW)
    kept = keep_released_states(llm)
    [got] = greedy(llm, PROMPTS[1:2], 20)  # a decode block joins the graph at step 16
    assert got == restated_greedy(llm.model, SinksAndTop(len(PROMPTS[1]), 5, 2), PROMPTS[1], 20)
    [state] = kept
    # the prefill's whole blocks, and one from decode
    assert all(len(llm.method.graph(state, layer, 0)) == (75 - WINDOW) // 16 * 16 + 16 for layer in range(2))


def test_retrievalattention_with_grouped_heads_reads_the_groups_best_keys(tiny_gqa_dir):
    from nanokv import LLM

    llm = LLM(str(tiny_gqa_dir), dtype="float32", method="retrievalattention", budget=WINDOW + 2 + 5, sinks=2,
              degree=4, beam=200, device_window=WINDOW)
    [got] = greedy(llm, PROMPTS[0:1], 12)
    assert got == restated_greedy(llm.model, SinksAndTop(len(PROMPTS[0]), 5, 2), PROMPTS[0], 12)


def test_retrievalattention_covering_the_cache_gives_full_and_bytes_fall_with_the_budget(make):
    full = make()
    expected = greedy(full)
    full_peak = full.stats["peak_kv_bytes"]
    llm = make("retrievalattention", budget=1000, sinks=4, beam=1000, device_window=WINDOW)
    assert greedy(llm) == expected
    assert greedy(llm, [PROMPTS[0], [7, 8, 9]], 4)[1] == greedy(full, [[7, 8, 9]], 4)[0]  # nothing moved
    greedy(llm)
    assert llm.stats["peak_kv_bytes"] < full_peak
    greedy(llm, PROMPTS[2:])
    moved = [llm.stats["kv_bytes_moved_per_decode_token"]]
    for budget in (WINDOW + 4 + 12, WINDOW + 4 + 2):
        small = make("retrievalattention", budget=budget, sinks=4, degree=4, beam=4, device_window=WINDOW)
        greedy(small, PROMPTS[2:])
        moved.append(small.stats["kv_bytes_moved_per_decode_token"])
    assert moved[0] > moved[1] > moved[2] > 0


def test_magicpig_picks_nothing_for_a_sequence_that_moved_nothing_yet():
    m = make_method("magicpig", budget=100, device_window=8, bits=2, tables=4, sinks=1, dense_every=0)
    keys = torch.randn(2, 1, 4, 4)
    state = {}
    codes = m.summarize(OffloadView(0, keys[0], keys[0], torch.arange(4), state))["codes"]
    codes = torch.stack([codes, torch.zeros_like(codes)])
    fetch = lambda name: {"codes": codes} if name == "codes" else {"keys": keys, "key_positions": None}
    picks = m.pick(offload_step(torch.randn(2, 2, 4), torch.tensor([[4], [0]]), fetch, 4, states=[state, {}]))
    assert picks.slots[0, 0, 0] == 0 and (picks.slots[1] == -1).all()
