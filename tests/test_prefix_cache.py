"""Prefix caching (issue 31): the storage (nanokv/cache/prefix_cache.py: chain hashes, reference
counts, LRU reuse), the engine's policy (nanokv/engine/prefix_sharing.py: which method shares what,
admission counts), and the engine end to end: greedy output with caching on equals caching off
(raw prefixes for full and a reader; compressed contexts reused by several questions), blocks
back in the pool after preemption and abort, and the blocks two sequences sharing a prefix save."""

import pytest
import torch

from nanokv import LLM, SamplingParams
from nanokv.cache.pool import BlockPool
from nanokv.cache.prefix_cache import PrefixCache, chain_key
from nanokv.engine.prefix_sharing import COMPRESSED, NONE, PREFIX, PrefixSharing, sharing_of
from nanokv.engine.sequence import Sequence
from nanokv.methods.registry import METHODS, make_method

SYSTEM = [(7 * i + 3) % 250 + 1 for i in range(70)]          # a shared "system prompt" of 70 tokens
PROMPTS = [SYSTEM + [200 + i, 17, 42 + i] for i in range(3)] + [SYSTEM[:40] + [9, 9, 9, 9], SYSTEM[:33]]


def greedy(steps=6):
    return SamplingParams(max_tokens=steps, ignore_eos=True)


def make(tiny_gqa_dir, **kwargs):
    return LLM(str(tiny_gqa_dir), dtype="float32", **kwargs)


# --- storage -----------------------------------------------------------------------------

def test_chain_key_names_the_whole_prefix_and_its_namespace():
    a = chain_key(b"full", [1, 2, 3])
    assert a == chain_key(b"full", [1, 2, 3])
    assert a != chain_key(b"snapkv", [1, 2, 3])            # another namespace
    assert chain_key(a, [4, 5]) != chain_key(chain_key(b"full", [1, 2, 4]), [4, 5])  # another parent
    assert chain_key(a, [4, 5]) != chain_key(a, [5, 4])


def test_refcounts_lru_and_reuse_of_freed_blocks():
    pool = BlockPool(11, 4, 8, torch.float32)
    cache = PrefixCache(pool)
    assert pool.num_free == 11
    first, second = pool.allocate(4), pool.allocate(4)
    pool.k[first] = 1.0
    e1 = cache.insert(chain_key(b"ns", [1]), [1], first.view(2, 2))
    e2 = cache.insert(chain_key(b"ns", [2]), [2], second.view(2, 2))
    assert pool.num_free == 3 and e1.refs == e2.refs == 1
    cache.acquire(e1)
    cache.release(e1)
    assert pool.num_free == 3                                # still held once
    cache.release(e1)
    cache.release(e2)
    assert pool.num_free == 11 and pool.num_used == 0        # unused entries count as free ...
    assert cache.get(e1.key, [1]) is e1                      # ... and keep their content and key
    assert bool((pool.k[first] == 1).all())
    assert cache.get(e1.key, [3]) is None                    # a key is checked against its tokens
    cache.acquire(e1)                                        # a hit takes it off the LRU list
    assert pool.num_free == 7
    cache.release(e1)                                        # now e2 is the least recently released
    got = pool.allocate(5)                                   # 3 truly free: the oldest entry goes
    assert cache.get(e2.key, [2]) is None and cache.get(e1.key, [1]) is e1
    assert pool.num_free == 6 and set(second.tolist()) & set(got.tolist())
    with pytest.raises(RuntimeError):
        cache.release(e2)                                    # evicted: nobody holds it


def test_every_registered_method_is_classified():
    """The docstring of engine/prefix_sharing.py lists these: a new method must be placed."""
    prefix = {"full", "quest", "tidaldecode", "recycled_attention", "tokenselect", "reattention", "lserve", "loki",
              "double_sparsity", "squeezed_attention"}
    compressed = {"random", "streaming_llm", "knorm", "snapkv", "pyramidkv", "adakv", "sage_kv", "nacl", "simlayerkv",
                  "chunkkv", "sepllm", "kvzip", "duoattention", "headkv", "kvmerger", "pyramidinfer", "dynamickv",
                  "dbudgetkv", "retrieval_head", "razorattention", "fastkv", "lazyllm", "infinipot", "citrus",
                  "cacheblend"}
    got = {}
    for name in METHODS:
        try:
            method = make_method(name, 0.5)
        except ValueError:                                   # readers, quantizers: no compression ratio
            method = make_method(name)
        kind, why = sharing_of(method)
        assert why.startswith(name)
        got.setdefault(kind, set()).add(name)
    assert got[PREFIX] == prefix
    assert got[COMPRESSED] == compressed
    assert got[NONE] == set(METHODS) - prefix - compressed
    assert {"h2o", "kivi", "arkvale", "minference", "gemfilter", "homer", "minicache", "kvsharer", "think"} <= got[NONE]
    assert sharing_of(make_method("snapkv"))[0] == PREFIX     # no compression: it stores full's KV
    assert sharing_of(make_method("snapkv+kivi", 0.5))[0] == NONE


# --- admission ---------------------------------------------------------------------------

def test_admission_counts_only_the_blocks_still_needed(tiny_gqa_dir):
    llm = make(tiny_gqa_dir, enable_prefix_caching=True)
    sharing, cache, bs = llm.prefix_sharing, llm.cache, llm.cache.block_size
    LH = cache.num_layers * cache.num_kv_heads
    llm.generate([SYSTEM[:50]], greedy(2))                   # registers 50 // 16 = 3 prefix blocks
    assert len(cache.prefix.entries) == 3 and cache.pool.num_used == 0

    def seq(ids):
        return Sequence(ids, greedy(2), set(), lambda t: "", 1024)

    a, b = seq(SYSTEM[:48] + [9] * 10), seq(SYSTEM[:48] + [8] * 10)
    whole = llm.scheduler.prefill_blocks(a)
    assert whole == LH * 4
    # 3 blocks cached, all unused: they count as free until taken, so they are counted as taken
    assert sharing.plan(a, whole) == whole - 3 * LH + 3 * LH and a.prefix_cached == 48
    free = cache.pool.num_free
    cache.add(a.id)
    sharing.attach(a)
    assert cache.pool.num_free == free - 3 * LH and int(cache.seqs[a.id].lengths.min()) == 48
    assert sharing.plan(b, whole) == whole - 3 * LH            # held by a now: nothing more to take
    exact = seq(SYSTEM[:48])                                  # its last token must run: 2 blocks, not 3
    assert sharing.plan(exact, LH * 3) == LH and exact.prefix_cached == 32
    cache.free(a.id)
    assert cache.pool.num_free == free and all(e.refs == 0 for e in cache.prefix.entries.values())


# --- the engine: caching on equals caching off -------------------------------------------

@pytest.mark.parametrize("method,options", [("full", {}), ("quest", {"budget": 32})])
def test_greedy_output_with_shared_prefixes_equals_without(tiny_gqa_dir, method, options):
    off = make(tiny_gqa_dir, method=method, **options)
    on = make(tiny_gqa_dir, method=method, enable_prefix_caching=True, **options)
    expected = [o.token_ids for o in off.generate(PROMPTS, greedy())]
    start = on.cache.pool.num_free
    assert [o.token_ids for o in on.generate(PROMPTS[:1], greedy())] == expected[:1]
    assert on.stats["prefix_cache_hit_tokens"] == 0
    assert [o.token_ids for o in on.generate(PROMPTS, greedy())] == expected
    # 64 + 64 + 64 + 32 + 32 of 73, 73, 73, 44, 33 prompt tokens came from the cache
    assert on.stats["prefix_cache_hit_tokens"] == 256
    assert on.stats["prefill_tokens_computed"] == sum(map(len, PROMPTS)) - 256
    assert on.stats["prefix_cache_hit_rate"] == pytest.approx(256 / sum(map(len, PROMPTS)))
    assert on.cache.pool.num_free == start
    assert all(e.refs == 0 for e in on.cache.prefix.entries.values())


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "kvzip"])
def test_a_compressed_context_is_reused_by_several_questions(tiny_gqa_dir, method):
    """(context, question): the context is compressed once and cached as compressed; later questions
    over it run only themselves, over that cache, and answer as a cold run does."""
    context = SYSTEM + SYSTEM[:23]                            # 93 tokens: heads end in partial blocks
    questions = [[200 + i, 31, 77, 5 + i] for i in range(3)]
    pairs = [(context, q) for q in questions]
    off = make(tiny_gqa_dir, method=method, compression=0.5)
    on = make(tiny_gqa_dir, method=method, compression=0.5, enable_prefix_caching=True)
    expected = [o.token_ids for o in off.generate(pairs, greedy())]
    start = on.cache.pool.num_free
    assert [o.token_ids for o in on.generate(pairs[:1], greedy())] == expected[:1]
    assert [o.token_ids for o in on.generate(pairs, greedy())] == expected
    assert on.stats["prefix_cache_hit_tokens"] == 3 * len(context)
    assert on.stats["prefill_tokens_computed"] == 3 * len(questions[0])
    other = make(tiny_gqa_dir, method=method, compression=0.25, enable_prefix_caching=True)
    assert other.prefix_sharing.policy(other.method)[2] != on.prefix_sharing.policy(on.method)[2]   # settings are part of the key
    assert on.cache.pool.num_free == start


def test_refcounts_survive_preemption_and_abort(tiny_gqa_dir):
    off = make(tiny_gqa_dir)
    on = make(tiny_gqa_dir, enable_prefix_caching=True)
    params = greedy(40)
    expected = [o.token_ids for o in off.generate(PROMPTS, params)]
    tight = make(tiny_gqa_dir, enable_prefix_caching=True, kv_cache_memory=64 * on.cache.pool.bytes_per_block)
    start = tight.cache.pool.num_free
    tight.generate(PROMPTS[:1], greedy(1))
    assert [o.token_ids for o in tight.generate(PROMPTS, params)] == expected
    assert tight.stats["preemptions"] > 0 and tight.stats["prefix_cache_hit_tokens"] > 0
    assert tight.cache.pool.num_free == start
    assert all(e.refs == 0 for e in tight.cache.prefix.entries.values())
    stream = iter(tight.stream(PROMPTS[1], params, chat=False))   # a client that goes away mid-stream
    next(stream)
    stream.close()
    assert tight.cache.pool.num_free == start and not tight.cache.held_entries
    assert all(e.refs == 0 for e in tight.cache.prefix.entries.values())


def test_two_sequences_sharing_a_prefix_hold_fewer_blocks(tiny_gqa_dir):
    two = [SYSTEM + [201, 5], SYSTEM + [202, 6]]
    off = make(tiny_gqa_dir)
    on = make(tiny_gqa_dir, enable_prefix_caching=True)
    on.generate([SYSTEM + [200, 4]], greedy(1))               # the prefix is cached, and unused
    assert [o.token_ids for o in on.generate(two, greedy())] == [o.token_ids for o in off.generate(two, greedy())]
    shared = (len(SYSTEM) // 16) * on.cache.num_layers * on.cache.num_kv_heads  # 4 prefix blocks held once
    assert off.stats["peak_kv_bytes"] - on.stats["peak_kv_bytes"] == shared * on.cache.pool.bytes_per_block


def test_methods_that_cannot_share_say_why(tiny_gqa_dir):
    llm = make(tiny_gqa_dir, method="h2o", compression=0.5, enable_prefix_caching=True)
    assert llm.prefix_sharing.kind == NONE and "decode step" in llm.prefix_sharing.reason
    llm.generate([SYSTEM], greedy(2))
    llm.generate([SYSTEM + [5]], greedy(2))
    assert llm.stats["prefix_cache_hit_rate"] == 0 and llm.stats["prefix_cache"]["sharing"] == NONE
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        make(tiny_gqa_dir, enable_prefix_caching="yes")
    assert isinstance(PrefixSharing(llm.cache, make_method("h2o", 0.5)).reason, str)
