"""ClusterKV and PQCache (issue 30, wave 7 group c): Offloaders that keep the older tokens in host
memory. The picks on hand-built summaries where the right tokens are known (whole clusters in the
order of q . centroid, the last cut at its newest tokens, sinks always; PQ lookup scores, the group's
softmaxes summed), what `summarize` keeps of hand-made keys (cluster ids and centroids, codes and
codebooks), the engine's greedy tokens against a plain restatement of each method over a GQA model,
a budget covering everything gives `full`'s tokens, bytes fall with the budget, bad options are
refused."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import DenseOffloaded, keep_released_states, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import OffloadView, ReadStep

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 110)]
WINDOW, SINK = 8, 4


def read_step(queries, summaries: dict, lengths, states, block_size=1, slots=None):
    """A ReadStep of one layer over hand-built host summaries {name: [b, H, S, ...]}."""
    b, H = lengths.shape
    S = next(iter(summaries.values())).shape[2] if slots is None else slots
    return ReadStep(layer=0, num_layers=1, queries=queries, positions=lengths[:, 0] + 100, lengths=lengths,
                    block_size=block_size, itemsize=4, states=states, step_state={},
                    fetch=lambda name: {name: summaries[name]}, pages=S // block_size)


def offload_view(keys, positions, state, layer=0):
    return OffloadView(layer, keys, torch.zeros_like(keys), positions, state)


def picked(picks) -> list[list[list[int]]]:
    """Each head's picked slots, sorted, -1s dropped."""
    return [[sorted(s for s in head if s >= 0) for head in seq] for seq in picks.slots.tolist()]


# --- clusterkv: the pick --------------------------------------------------------------------

def clusters_step():
    # 12 host slots of 2 kv-heads: 0, 1 sinks (cluster -1); cluster 0 = {2, 5, 8}, 1 = {3, 6, 9, 10},
    # 2 = {4, 7, 11}; centroids c0 = +x, c1 = +y, c2 = -x (the same for both heads)
    ids = torch.tensor([-1, -1, 0, 1, 2, 0, 1, 2, 0, 1, 1, 2], dtype=torch.int32).expand(1, 2, 12)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).expand(2, 3, 2)
    return {"cluster": ids}, [{"centroids": {0: centroids}}]


def test_clusterkv_recalls_whole_clusters_nearest_the_query_and_cuts_the_last_at_its_newest():
    summaries, states = clusters_step()
    # head 0's group (2, 0), (0, 1): c0 scores 2, c1 1, c2 0 -> c0 whole, then c1's two oldest;
    # head 1's group (-1, 0.5), (0.9, 0): the highest of the group: c2 1, c0 0.9, c1 0.5 -> c2, then c0's
    # two oldest (the group's mean would rank c1 first: 0.25, then c2 0.05, c0 -0.05)
    q = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.9, 0.0]]])
    method = make_method("clusterkv", budget=1 + 2 + 5, device_window=1, sink=2)
    picks = method.pick(read_step(q, summaries, torch.tensor([[12, 12]]), states))
    assert picked(picks) == [[[0, 1, 2, 3, 5, 6, 8], [0, 1, 2, 4, 5, 7, 11]]]
    # an int32 id per host token and the centroids [H = 2, 3, D = 2] float32
    assert int(picks.scored_bytes) == 2 * 12 * 4 + 2 * 3 * 2 * 4


def test_clusterkv_counts_only_held_tokens_and_picks_fewer_when_the_host_holds_fewer():
    summaries, states = clusters_step()
    q = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 1.0]]])
    method = make_method("clusterkv", budget=1 + 2 + 5, device_window=1, sink=2)
    # head 0 holds 7 slots: c0 = {2, 5}, c1 = {3, 6}, c2 = {4}: all 5 clustered ones fit;
    # head 1 holds 1 slot, a sink
    picks = method.pick(read_step(q, summaries, torch.tensor([[7, 1]]), states))
    assert picked(picks) == [[[0, 1, 2, 3, 4, 5, 6], [0]]]


# --- clusterkv: what summarize keeps ---------------------------------------------------------

def test_clusterkv_clusters_the_prompt_by_direction_and_each_later_block_apart():
    method = make_method("clusterkv", budget=100, device_window=8, sink=2, clusters=2)
    # the clustered keys start the k-means at keys 0 and 2 of the 5 ((1, 0) and (0, 1)); the long
    # (3, 0.5) is nearer (1, 0) in direction than (0, 1), whatever its length
    keys = torch.tensor([[9.0, 9.0], [9.0, -9.0], [1.0, 0.0], [2.0, 0.2], [0.0, 1.0], [0.1, 3.0], [3.0, 0.5]])[None]
    state = {}
    out = method.summarize(offload_view(keys, torch.arange(7), state))
    assert out["cluster"].tolist() == [[-1, -1, 0, 0, 1, 1, 0]]
    centroids = state["centroids"][0]
    assert torch.allclose(centroids[0], torch.tensor([[2.0, 0.7 / 3], [0.05, 2.0]]))  # mean raw keys
    # a decode block of 3 keys: one new cluster (3 / 40 rounded up), id 2, its mean
    block = torch.tensor([[0.0, -1.0], [0.0, -2.0], [1.0, 1.0]])[None]
    out = method.summarize(offload_view(block, torch.arange(7, 10), state))
    assert out["cluster"].tolist() == [[2, 2, 2]]
    assert torch.allclose(state["centroids"][0][0, 2], torch.tensor([1 / 3, -2 / 3]))


# --- pqcache: the pick ------------------------------------------------------------------------

def test_pqcache_scores_each_token_by_its_codes_lookup_and_always_reads_the_sinks():
    # D = 4 in m = 2 sub-spaces of 2; sub-space 0's centroids (1, 0), (-1, 0), sub-space 1's (0, 1),
    # (0, -1). q = (1, 0 | 0, 2): codes (0, 0) score 3, (1, 0) 1, (0, 1) -1, (1, 1) -3.
    books = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]]])[None]   # [H, m, K, d]
    codes = torch.tensor([[0, 0], [0, 0], [1, 1], [0, 1], [0, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.uint8)
    q = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])
    method = make_method("pqcache", budget=1 + 2 + 2, device_window=1, sink=2, subspaces=2)
    step = read_step(q, {"codes": codes[None, None]}, torch.tensor([[8]]), [{"codebooks": {0: books.view(2, 2, 2)}}])
    picks = method.pick(step)
    # the sinks 0, 1 (their codes (0, 0) score 3, but they are read anyway), then slots 4 (3) and 5 (1)
    assert picked(picks) == [[[0, 1, 4, 5]]]
    assert int(picks.scored_bytes) == 8 * 2 + 2 * 2 * 2 * 4   # 2 one-byte codes per token, the codebooks


def test_pqcache_sums_the_groups_softmaxes_not_the_highest_score():
    # m = 1: a code is a whole key. Head A: slot 0 at 10, slot 1 at 9.9 (logits / sqrt(2)); head B:
    # slot 1 at 5, the rest 0. The highest score would take slot 0; the summed softmaxes give slot 1
    # about 0.48 + 0.94 against slot 0's 0.52 + 0.03.
    books = torch.tensor([[10.0, 0.0], [9.9, 5.0], [0.0, 0.0]])[None]                 # [H * m, K, D]
    codes = torch.tensor([[0], [1], [2]], dtype=torch.uint8)
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    method = make_method("pqcache", budget=2, device_window=1, sink=0, subspaces=1)
    picks = method.pick(read_step(q, {"codes": codes[None, None]}, torch.tensor([[3]]), [{"codebooks": {0: books}}]))
    assert picked(picks) == [[[1]]]


# --- pqcache: what summarize keeps ---------------------------------------------------------

def test_pqcache_learns_a_codebook_per_subspace_once_and_codes_later_blocks_with_it():
    method = make_method("pqcache", budget=100, device_window=8, sink=1, subspaces=2, bits=1)
    # sub-space 0 (channels 0, 1) splits rows {1, 2} (+x) from {3, 4} (-x); sub-space 1 (channels 2,
    # 3) rows {1, 4} (+y) from {2, 3} (-y); the k-means of each starts at rows 1 and 3 (0 and 2 of
    # the 4 past the sink). Row 0 is a sink, left out (its far-off key would take a centroid).
    keys = torch.tensor([[50.0, 50.0, 50.0, 50.0],
                         [1.0, 0.0, 0.0, 5.0],
                         [1.2, 0.0, 0.0, -5.0],
                         [-1.0, 0.0, 0.0, -4.0],
                         [-1.2, 0.0, 0.0, 4.0]])[None]
    state = {}
    out = method.summarize(offload_view(keys, torch.arange(5), state))
    assert out["codes"].dtype == torch.uint8
    assert out["codes"][0, 1:].tolist() == [[0, 0], [0, 1], [1, 1], [1, 0]]
    books = state["codebooks"][0].view(1, 2, 2, 2)
    assert torch.allclose(books[0, 0], torch.tensor([[1.1, 0.0], [-1.1, 0.0]]))
    assert torch.allclose(books[0, 1], torch.tensor([[0.0, 4.5], [0.0, -4.5]]))
    # a first batch of sinks alone learns nothing: the codebooks wait for keys past the sinks
    early = {}
    assert method.summarize(offload_view(keys[:, :1], torch.arange(1), early))["codes"].shape == (1, 1, 2)
    assert early["codebooks"] == {}
    # a later block is coded with the same codebooks, which stay as they were
    out = method.summarize(offload_view(torch.tensor([[[-3.0, 0.0, 0.0, -1.0]]]), torch.tensor([5]), state))
    assert out["codes"].tolist() == [[[1, 1]]]
    assert torch.equal(state["codebooks"][0].view(1, 2, 2, 2), books)


# --- plain restatements, through the engine ---------------------------------------------------

def plain_spherical_kmeans(x, C, iterations):
    """Lloyd on directions, started at keys 0, n // C, 2n // C, ...: (labels [n], mean raw key per cluster)."""
    directions = F.normalize(x, dim=-1)
    cent = directions[[i * len(x) // C for i in range(C)]]
    for _ in range(iterations):
        labels = (directions @ cent.T).argmax(1)
        for c in range(C):
            if (labels == c).any():
                cent[c] = F.normalize(directions[labels == c].mean(0), dim=0)
    labels = (directions @ cent.T).argmax(1)
    means = torch.stack([x[labels == c].mean(0) if (labels == c).any() else torch.zeros(x.shape[1])
                         for c in range(C)])
    return labels, means


class PlainClusterKV(DenseOffloaded):
    """ClusterKV stated plainly: the prompt's host keys (past the sinks) in `clusters` clusters by
    direction, each later block of 16 a cluster of its own; whole clusters by the highest q . mean,
    oldest first within a cluster, until k; the sinks always."""

    def __init__(self, prompt_len, k, clusters, iterations):
        super().__init__(prompt_len, WINDOW, k)
        self.clusters, self.iterations, self.prompt_clusters = clusters, iterations, {}

    def older(self, layer, h, q, keys):
        first = (self.prompt_len - WINDOW) // 16 * 16  # what the prefill moved: whole blocks
        if (layer, h) not in self.prompt_clusters:   # the prompt is clustered once
            self.prompt_clusters[layer, h] = plain_spherical_kmeans(keys[SINK:first], min(self.clusters, first - SINK),
                                                                    self.iterations)
        labels, means = self.prompt_clusters[layer, h]
        members = [(labels == c).nonzero().flatten() + SINK for c in range(len(means))]
        for start in range(first, len(keys), 16):       # the decode blocks moved since
            members.append(torch.arange(start, start + 16))
            means = torch.cat([means, keys[start:start + 16].mean(0, keepdim=True)])
        chosen = list(range(SINK))
        for c in sorted(range(len(means)), key=lambda c: -float((q @ means[c]).max())):
            chosen += members[c].tolist()[:self.k - (len(chosen) - SINK)]
        return torch.tensor(chosen)


def plain_kmeans(x, K, iterations):
    cent = x[[i * len(x) // K for i in range(K)]].clone()
    for _ in range(iterations):
        labels = torch.cdist(x, cent).argmin(1)
        for c in range(K):
            if (labels == c).any():
                cent[c] = x[labels == c].mean(0)
    return cent


class PlainPQCache(DenseOffloaded):
    """PQCache stated plainly: a codebook per sub-space from the prompt's host keys past the sinks,
    every host key coded by its nearest centroids; each query head's softmax over the lookup scores
    of the tokens past the sinks, summed over the group, top k (of equal scores, the oldest); the
    sinks always."""

    def __init__(self, prompt_len, k, m, bits, iterations):
        super().__init__(prompt_len, WINDOW, k)
        self.m, self.bits, self.iterations, self.books = m, bits, iterations, {}

    def older(self, layer, h, q, keys):
        first, D = (self.prompt_len - WINDOW) // 16 * 16, keys.shape[1]
        d = D // self.m
        scores = torch.zeros(q.shape[0], len(keys))
        for j in range(self.m):
            sub = keys[:, j * d:(j + 1) * d]
            if (layer, h, j) not in self.books:   # learned once, from the prompt
                K = min(2 ** self.bits, first - SINK)
                self.books[layer, h, j] = plain_kmeans(sub[SINK:first], K, self.iterations)
            book = self.books[layer, h, j]
            scores += (q[:, j * d:(j + 1) * d] @ book.T)[:, torch.cdist(sub, book).argmin(1)]
        probs = (scores[:, SINK:] / math.sqrt(D)).softmax(-1).sum(0)
        top = probs.argsort(descending=True, stable=True)[:self.k] + SINK   # equal scores: the oldest first
        return torch.cat([torch.arange(SINK), top])


def make(path, method="full", budget=None, **kw):
    from nanokv import LLM

    return LLM(str(path), dtype="float32", method=method, budget=budget, **kw)


def greedy(llm, prompts=PROMPTS, steps=16):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


CLUSTERKV = dict(skip_layers=0, device_window=WINDOW, sink=SINK, clusters=6, iterations=20)
PQCACHE = dict(skip_layers=0, device_window=WINDOW, sink=SINK, subspaces=2, bits=3, iterations=10)


def test_clusterkv_reads_what_a_plain_restatement_reads(tiny_gqa_dir):
    k = 10
    llm = make(tiny_gqa_dir, "clusterkv", WINDOW + SINK + k, **CLUSTERKV)
    prompt, kept = PROMPTS[1], keep_released_states(llm)
    [got] = greedy(llm, [prompt], 20)   # past a block of decode steps: the block joins as a cluster
    assert got == restated_greedy(llm.model, PlainClusterKV(len(prompt), k, 6, 20), prompt, 20)
    [state] = kept
    assert [c.shape[1] for c in state["centroids"].values()] == [6 + 1, 6 + 1]   # per layer


def test_pqcache_reads_what_a_plain_restatement_reads(tiny_gqa_dir):
    k = 10
    llm = make(tiny_gqa_dir, "pqcache", WINDOW + SINK + k, **PQCACHE)
    prompt = PROMPTS[2]
    [got] = greedy(llm, [prompt], 20)
    assert got == restated_greedy(llm.model, PlainPQCache(len(prompt), k, 2, 3, 10), prompt, 20)


@pytest.fixture(scope="module")
def full_tokens(tiny_gqa_dir):
    full = make(tiny_gqa_dir)
    return greedy(full), full.stats["peak_kv_bytes"]


@pytest.mark.parametrize("method, options", [("clusterkv", CLUSTERKV), ("pqcache", PQCACHE)])
def test_a_budget_covering_the_cache_gives_full_and_bytes_fall_with_the_budget(tiny_gqa_dir, full_tokens,
                                                                              method, options):
    expected, full_peak = full_tokens
    whole = make(tiny_gqa_dir, method, 1000, **options)
    assert greedy(whole) == expected
    assert 0 < whole.stats["peak_kv_bytes"] < full_peak
    moved = [whole.stats["kv_bytes_moved_per_decode_token"]]
    for budget in (40, 16):
        llm = make(tiny_gqa_dir, method, budget, **options)
        out = greedy(llm)
        moved.append(llm.stats["kv_bytes_moved_per_decode_token"])
    assert moved[0] > moved[1] > moved[2] > 0
    assert out != expected   # 4 older tokens per head change the tokens of this random model


def test_bad_options_are_refused_with_the_valid_choices(tiny_gqa_dir):
    with pytest.raises(ValueError, match="bits=9 .*1..8"):
        make_method("pqcache", budget=100, device_window=8, sink=4, bits=9)
    with pytest.raises(ValueError, match="clusters=0 .*>= 1"):
        make_method("clusterkv", budget=100, clusters=0)
    with pytest.raises(ValueError, match="budget=20 must exceed device_window \\+ sink = 16 \\+ 4"):
        make_method("clusterkv", budget=20, device_window=16, sink=4)
    with pytest.raises(ValueError, match="--budget"):
        make_method("pqcache", compression=0.5)
    with pytest.raises(ValueError, match="subspaces=3 must divide the head dimension 32"):
        make(tiny_gqa_dir, "pqcache", 100, device_window=8, sink=4, subspaces=3)
    # a budget under the official one keeps the official shares of window and sinks
    small = make_method("pqcache", budget=256)
    assert (small.device_window, small.sink) == (128, 8)
