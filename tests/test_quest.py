"""Quest in the engine: page bounds kept in the pool through writes and compaction; decode reads
only the picked pages and gives what a plain restatement of Quest gives; a budget covering
the context gives `full` exactly; the bytes read fall with the budget."""

from types import SimpleNamespace

import pytest
import torch

from helpers import DenseLayers, restated_greedy
from nanokv.cache import PagedKVCache

PROMPT = list(range(1000, 1300))


def test_key_bounds_follow_writes_and_compaction():
    cfg = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=8)
    cache = PagedKVCache.from_memory(cfg, 1 << 20, 4, torch.float32, key_bounds=True)
    cache.add(0)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(10, 2, 8, generator=gen)
    for layer in range(2):
        cache.write(cache.append_slots(0, 10, layers=slice(layer, layer + 1))[0], k, k, torch.arange(10))
    keep = torch.rand(2, 2, 10, generator=gen) > 0.5
    keep[..., 0] = True
    cache.compact(0, keep)
    s, f = cache.seqs[0], cache.pool.block_fields
    for layer in range(2):
        for head in range(2):
            kept = k[keep[layer, head], head]
            for j in range(int(s.num_blocks[layer, head])):
                block = s.tables[layer, head, j]
                held = kept[4 * j:4 * j + 4]
                assert torch.equal(f["kmin"][block], held.amin(0)) and torch.equal(f["kmax"][block], held.amax(0))
    assert cache.pool.bytes_per_block == 4 * (2 * 8 * 4 + 4) + 2 * 8 * 4  # the bounds are counted


class DenseQuest(DenseLayers):
    """Quest stated plainly, as the model's attention callable: every layer keeps all its keys;
    a decode step past layer `skip` splits them into pages of 16 by position, bounds each page by
    max over the kv-head's query heads of sum_c max(q_c max_c, q_c min_c), and attends over the
    top `pages` (the newest always) only."""

    def __init__(self, pages, skip=2):
        super().__init__()
        self.pages, self.skip = pages, skip

    def decode(self, layer, q, keys, values):
        n, H = len(keys), keys.shape[1]
        if layer < self.skip:
            return self.dense(q, keys, values)
        group, chosen = q.shape[1] // H, []
        for h in range(H):
            pages = [(p, min(p + 16, n)) for p in range(0, n, 16)]
            qh = q[0, h * group:(h + 1) * group].float()
            bound = [max(float(torch.maximum(qg * keys[a:b, h].amax(0), qg * keys[a:b, h].amin(0)).sum())
                         for qg in qh) for a, b in pages]
            newest = len(pages) - 1
            order = sorted(range(len(pages)), key=lambda i: (i != newest, -bound[i]))[:self.pages]
            chosen.append(torch.cat([torch.arange(*pages[i]) for i in sorted(order)]))
        return self.attend(q, keys, values, chosen)


@pytest.mark.slow
def test_engine_matches_a_plain_statement_of_quest(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    steps, budget = 24, 64  # 4 of the 19-20 pages
    llm = LLM(str(smollm2_gguf), dtype="float32", method="quest", budget=budget)
    [out] = llm.generate([PROMPT], SamplingParams(max_tokens=steps, ignore_eos=True))
    reference = DenseQuest(budget // 16)
    tokens = restated_greedy(llm.model, reference, PROMPT, steps)
    assert out.token_ids == tokens


@pytest.mark.slow
def test_a_budget_covering_the_context_is_full_exactly_and_reads_fall_with_the_budget(smollm2_gguf):
    from nanokv import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    full = LLM(str(smollm2_gguf), dtype="float32")
    [expected] = full.generate([PROMPT], params)
    read = {}
    for budget in (512, 256, 64):
        llm = LLM(str(smollm2_gguf), dtype="float32", method="quest", budget=budget)
        [out] = llm.generate([PROMPT], params)
        read[budget] = llm.stats["kv_bytes_read_per_decode_token"]
        if budget == 512:  # every page picked, in order: the same attention calls as full
            assert out.token_ids == expected.token_ids
    # ~19 pages of 16 tokens: layers 0-1 read them all, the other 28 layers 16, then 4 (+ the bounds)
    assert read[512] > full.stats["kv_bytes_read_per_decode_token"] > read[256] > read[64]
    assert read[64] < 0.4 * full.stats["kv_bytes_read_per_decode_token"]
