"""The paged head-block KV cache: block bookkeeping, data kept through compaction, and paged
attention against the dense reference.

The randomized test drives PagedKVCache with random adds, appends, compactions and frees and,
after every operation, compares what the cache holds with a plain-Python model of it: for every
(sequence, layer, kv-head), the list of tokens it should hold, in order. Every token's K, V and
extra slot field are built from (sequence, layer, head, position), so a token that lands in the
wrong head, moves to the wrong slot or gets overwritten is caught by its value.
"""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from helpers import paged_layout
from nanokv.kernels.reference import attention_by_position, paged_attention
from nanokv.cache import BlockPool, OutOfBlocks, PagedKVCache
from nanokv.engine.attention import StepAttention

L, H, D, BS = 3, 2, 4, 4  # layers, kv-heads, head_dim, block_size of the randomized test


# --- recognisable token values ------------------------------------------------------------

def k_of(seq, layer, head, pos):
    return [float(seq), float(layer), float(head), float(pos)]


def v_of(seq, layer, head, pos):
    return [pos + 0.5, head + 0.25, layer + 0.125, -float(seq)]


def score_of(seq, layer, head, pos):
    return 1000.0 * seq + 100.0 * layer + 10.0 * head + pos + 0.5


# --- reading the cache back, independently of flat_slots ----------------------------------

def read_head(cache, seq_id, layer, head):
    """(pos, k, v, score) of every slot the head holds, walking its block table by hand."""
    s, pool = cache.seqs[seq_id], cache.pool
    out = []
    for i in range(int(s.lengths[layer, head])):
        block, offset = int(s.tables[layer, head, i // BS]), i % BS
        out.append((int(pool.pos[block, offset]), pool.k[block, offset].tolist(),
                    pool.v[block, offset].tolist(), float(pool.fields["score"][block, offset])))
    return out


def expected_head(seq_id, layer, head, positions):
    return [(p, k_of(seq_id, layer, head, p), v_of(seq_id, layer, head, p), score_of(seq_id, layer, head, p))
            for p in positions]


def check_invariants(cache, model):
    """model: seq_id -> [L][H] lists of the positions each head should hold, in slot order."""
    pool = cache.pool
    assert set(cache.seqs) == set(model)
    owned = []
    for seq_id, heads in model.items():
        s = cache.seqs[seq_id]
        for layer in range(L):
            for head in range(H):
                n_tokens, n_blocks = int(s.lengths[layer, head]), int(s.num_blocks[layer, head])
                assert n_tokens == len(heads[layer][head]), (seq_id, layer, head)
                assert n_blocks == math.ceil(n_tokens / BS), (seq_id, layer, head, n_tokens, n_blocks)
                row = s.tables[layer, head].tolist()
                assert all(0 <= b < pool.num_blocks for b in row[:n_blocks]), row
                assert all(b == -1 for b in row[n_blocks:]), row
                owned += row[:n_blocks]
                assert read_head(cache, seq_id, layer, head) == \
                    expected_head(seq_id, layer, head, heads[layer][head]), (seq_id, layer, head)
    free = pool._free[:pool.num_free].tolist()  # the pool's free stack
    assert len(set(owned)) == len(owned), "a block is owned by two (sequence, layer, head)"
    assert len(set(free)) == len(free), "a block is on the free stack twice"
    assert not set(owned) & set(free), "a block is both owned and free"
    assert len(owned) + len(free) == pool.num_blocks, "a block leaked"
    assert pool.num_used == len(owned)
    assert set(torch.nonzero(pool._in_use).flatten().tolist()) == set(owned)
    bytes_per_block = BS * (2 * D * 4 + 4 + 4)  # K and V (float32), int32 position, float32 score
    assert pool.used_bytes == len(owned) * bytes_per_block
    assert pool.used_bytes == sum(cache.seq_bytes(s) for s in cache.seqs)


# --- 1. randomized operations against a Python model ---------------------------------------

def append(cache, model, next_pos, seq_id, n):
    slots = cache.append_slots(seq_id, n)
    assert slots.shape == (L, H, n)
    positions = list(range(next_pos[seq_id], next_pos[seq_id] + n))
    for layer in range(L):
        k = torch.tensor([[k_of(seq_id, layer, h, p) for h in range(H)] for p in positions])   # [T, H, D]
        v = torch.tensor([[v_of(seq_id, layer, h, p) for h in range(H)] for p in positions])
        cache.write(slots[layer], k, v, torch.tensor(positions))
        scores = torch.tensor([[score_of(seq_id, layer, h, p) for p in positions] for h in range(H)])
        cache.pool.fields["score"].view(-1)[slots[layer].flatten()] = scores.flatten()
        for head in range(H):
            model[seq_id][layer][head] += positions
    next_pos[seq_id] += n


APPEND_SIZES = [1, 1, 1, 2, 3, 5, 8, 13]


def append_or_refuse(cache, model, next_pos, seq_id, n):
    """Append n tokens when the pool has the blocks (True); otherwise check that append_slots
    refuses with OutOfBlocks and changes nothing (False)."""
    need = sum(math.ceil((len(h) + n) / BS) - math.ceil(len(h) / BS) for heads in model[seq_id] for h in heads)
    assert cache.blocks_to_append(seq_id, n) == need
    # all the sequences in one pass (the scheduler's decode step) agree with each one alone
    assert cache.blocks_to_append_each(list(model), n) == [cache.blocks_to_append(s, n) for s in model]
    if need <= cache.pool.num_free:
        append(cache, model, next_pos, seq_id, n)
        return True
    free_before = cache.pool.num_free
    with pytest.raises(OutOfBlocks):
        cache.append_slots(seq_id, n)
    assert cache.pool.num_free == free_before
    return False


def random_compact(rng, cache, model, seq_id):
    """Random keep masks per (layer, head), over a random run of layers."""
    first = rng.randrange(L)
    last = rng.randrange(first, L) + 1
    heads = [model[seq_id][layer][head] for layer in range(first, last) for head in range(H)]
    # sometimes wider than any head, as a mask padded to the longest sequence of a batch would be
    S = max(len(h) for h in heads) + rng.choice([0, 0, 3, 40])
    keep = torch.zeros(last - first, H, S, dtype=torch.bool)
    for layer in range(first, last):
        for head in range(H):
            held = model[seq_id][layer][head]
            p = rng.choice([0.0, 0.3, 0.6, 0.9, 1.0])
            kept = [i for i in range(len(held)) if rng.random() < p]
            keep[layer - first, head, kept] = True
            model[seq_id][layer][head] = [held[i] for i in kept]
    cache.compact(seq_id, keep, layers=slice(first, last))


def random_evict(rng, cache, model, seq_id):
    """Decode-time eviction's two moves: in random heads, the last slot into a random victim's
    place (move_slots), then the heads shortened by one (drop_last)."""
    s = cache.seqs[seq_id]
    drop = torch.zeros(L, H, dtype=torch.bool)
    src, dst = [], []
    for layer in range(L):
        for head in range(H):
            held = model[seq_id][layer][head]
            if held and rng.random() < 0.5:
                victim = rng.randrange(len(held))
                src.append(int(cache.flat_slots(s.tables[layer, head], torch.tensor([len(held) - 1]))[0]))
                dst.append(int(cache.flat_slots(s.tables[layer, head], torch.tensor([victim]))[0]))
                held[victim] = held[-1]
                held.pop()
                drop[layer, head] = True
    cache.move_slots(torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long))
    cache.drop_last(seq_id, drop)


def check_mirror(cache):
    """After the pending edits are applied, the device mirror (DeviceTables) holds each sequence's
    tables in its row, -1 everywhere else: past each head's blocks, and in every row no sequence owns."""
    mirror = cache.mirror
    mirror.sync()
    expected = torch.full_like(mirror.tables, -1)
    for seq_id, s in cache.seqs.items():
        held = torch.arange(s.tables.shape[-1]) < s.num_blocks[..., None]
        width = min(s.tables.shape[-1], mirror.tables.shape[-1])
        assert not held[..., width:].any()
        expected[:, mirror.rows[seq_id], :, :width] = torch.where(held, s.tables, -1)[..., :width]
    assert torch.equal(mirror.tables, expected)
    assert sorted([*mirror.rows.values(), *mirror.free_rows]) == list(range(1, mirror.next_row))


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_blocks_and_data_consistent(seed):
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=72, block_size=BS, head_dim=D, dtype=torch.float32,
                     extra_fields={"score": torch.float32})
    pool.k.fill_(float("nan"))
    pool.v.fill_(float("nan"))
    cache = PagedKVCache(L, H, pool)
    model, next_pos, new_id = {}, {}, 0
    done = dict.fromkeys(["add", "append", "refused", "compact", "evict", "free", "ragged", "grown"], 0)
    for _ in range(150):
        op = rng.choices(["add", "append", "compact", "evict", "free"], [2, 6, 2, 2, 2])[0]
        if op == "add" or not model:
            cache.add(new_id)
            model[new_id] = [[[] for _ in range(H)] for _ in range(L)]
            next_pos[new_id] = rng.randrange(3)  # positions need not start at 0
            new_id += 1
            done["add"] += 1
        elif op == "append":
            appended = append_or_refuse(cache, model, next_pos, rng.choice(list(model)), rng.choice(APPEND_SIZES))
            done["append" if appended else "refused"] += 1
        elif op == "compact":
            random_compact(rng, cache, model, rng.choice(list(model)))
            done["compact"] += 1
        elif op == "evict":
            random_evict(rng, cache, model, rng.choice(list(model)))
            done["evict"] += 1
        else:
            seq_id = rng.choice(list(model))
            cache.free(seq_id)
            del model[seq_id]
            done["free"] += 1
        check_invariants(cache, model)
        if rng.random() < 0.5:  # else the mirror's edits pile up over several operations
            check_mirror(cache)
        done["ragged"] += any(len({len(h) for heads in m for h in heads}) > 1 for m in model.values())
        done["grown"] += any(s.tables.shape[-1] > 4 for s in cache.seqs.values())
    # then run the pool dry: appends until one is refused
    if not model:
        cache.add(new_id)
        model[new_id], next_pos[new_id] = [[[] for _ in range(H)] for _ in range(L)], 0
    while append_or_refuse(cache, model, next_pos, rng.choice(list(model)), rng.choice(APPEND_SIZES)):
        check_invariants(cache, model)
    done["refused"] += 1
    check_invariants(cache, model)
    check_mirror(cache)
    # the run exercised every path, including heads of different lengths and grown tables
    assert all(done.values()), done
    for seq_id in list(model):
        cache.free(seq_id)
    assert pool.num_free == pool.num_blocks and pool.used_bytes == 0


def test_the_mirror_takes_a_few_edits_a_decode_step():
    """Appending a token to a head whose last block has room changes no table entry; one that fills
    a block edits one entry per (layer, head); an entry edited twice before it is sent goes once,
    with its last value."""
    cache = PagedKVCache(L, H, BlockPool(64, BS, D, torch.float32))
    cache.add(0)

    def sent():
        edits = cache.table_edits()
        cache.apply_table_edits(edits)
        return edits

    cache.append_slots(0, 5)                      # two blocks a head
    assert len(sent()[0]) == 2 * L * H
    cache.append_slots(0, 3)                      # fills the second block: no new one
    assert sent() == []
    cache.append_slots(0, 1)                      # a third block in every head
    index, ids = sent()
    assert len(index) == L * H and torch.equal(ids, cache.seqs[0].tables[..., 2].flatten())
    cache.append_slots(0, 1)
    cache.drop_last(0, torch.full((L, H), 2))     # the third block goes back before any step sent it
    index, ids = sent()
    assert len(index) == L * H and (ids == -1).all()
    check_mirror(cache)


def test_edits_a_failed_step_did_not_apply_are_sent_again():
    """A step that raises after taking the edits and before applying them (a failed copy, say)
    leaves them recorded: the next step sends them, and the mirror ends equal to the tables."""
    cache = PagedKVCache(L, H, BlockPool(64, BS, D, torch.float32))
    cache.add(0)
    cache.append_slots(0, 5)
    lost = cache.table_edits()                    # the step fails here: never applied
    cache.append_slots(0, 4)                      # a third block a head, in the next step
    index, ids = cache.table_edits()
    assert len(index) == len(lost[0]) + L * H
    cache.apply_table_edits([index, ids])
    assert cache.table_edits() == []
    check_mirror(cache)


def test_the_mirror_grows_by_doubling_up_to_its_bound_and_then_as_asked():
    """Bounded at 5 rows and 12 columns, the mirror doubles (1 -> 2 -> 4 rows, 4 -> 8 columns) and
    then stops at the bound (5, 12), so it never takes more than most_bytes; asked for more than
    the bound it grows to exactly that (it never refuses a sequence)."""
    from nanokv.cache.device_tables import DeviceTables

    mirror = DeviceTables(L, H, "cpu")
    mirror.bound(5, 12)
    shapes = []
    for seq_id in range(4):
        mirror.add(seq_id)
        shapes.append(mirror.tables.shape[1])
    assert shapes == [2, 4, 4, 5]
    mirror.record(0, torch.tensor([[0, 0, 6]]), torch.tensor([7]))
    mirror.sync()
    assert mirror.tables.shape[-1] == 8
    mirror.record(0, torch.tensor([[0, 0, 10]]), torch.tensor([7]))
    mirror.sync()
    assert mirror.tables.shape[-1] == 12 and mirror.tables.nbytes == DeviceTables.most_bytes(L, H, 5, 12)
    mirror.add(4)
    mirror.record(0, torch.tensor([[0, 0, 20]]), torch.tensor([7]))
    mirror.sync()
    assert mirror.tables.shape[1:] == (6, H, 21)


def test_each_request_names_the_tables_tiers_of_the_cache_it_builds():
    from nanokv.cache.build import CacheRequest, HostTier, build_cache
    from nanokv.cache.quant_pool import QuantSpec

    cfg = SimpleNamespace(num_layers=L, num_kv_heads=H, head_dim=8, sliding_windows=[None] * L)
    for request in (CacheRequest(), CacheRequest(key_channels=4), CacheRequest(quantization=QuantSpec(4, True, 8, 32)),
                    CacheRequest(host_tier=HostTier(device_window=8))):
        cache = build_cache(request, cfg, 1 << 20, 4, torch.float32, "cpu", None, 1 << 20)
        assert request.table_tiers() == 1 + hasattr(cache, "cold_mirror"), request


def test_a_decode_step_works_its_slots_out_on_the_device():
    """append_decode (allocation on the host only where a head needs a block) then decode_slots
    (slots from the mirrored tables and the lengths) gives the slots, tables and lengths that
    append_slots gives sequence by sequence, over steps that cross block boundaries, with heads
    of different lengths after a compaction."""
    def cache_with_prompts():
        cache = PagedKVCache(L, H, BlockPool(200, BS, D, torch.float32))
        gen = torch.Generator().manual_seed(0)
        for seq_id, n in enumerate([1, 4, 7, 13]):
            cache.add(seq_id)
            cache.append_slots(seq_id, n)
            cache.compact(seq_id, torch.rand(L, H, n, generator=gen) < 0.7)
        return cache

    per_sequence, on_device, seq_ids = cache_with_prompts(), cache_with_prompts(), [3, 0, 2, 1]
    for _ in range(9):
        expected = torch.cat([per_sequence.append_slots(s, 1) for s in seq_ids], dim=-1)       # [L, H, b]
        on_device.append_decode(seq_ids)
        [group] = on_device.decode_groups(seq_ids, whole_batch=True)
        on_device.mirror.sync()
        _, tables, lengths = on_device.device_group(group, group.host)
        assert torch.equal(on_device.decode_slots(tables, lengths), expected)
        for s in seq_ids:
            a, b = per_sequence.seqs[s], on_device.seqs[s]
            assert torch.equal(a.lengths, b.lengths) and torch.equal(a.num_blocks, b.num_blocks)
            assert torch.equal(a.tables, b.tables)
    assert any(len(set(s.lengths.flatten().tolist())) > 1 for s in per_sequence.seqs.values())  # ragged heads


def test_blocks_to_append_for_a_new_sequence():
    cache = PagedKVCache(L, H, BlockPool(8, BS, D, torch.float32))
    # 9 tokens need 3 blocks of 4 in each of the 3 x 2 heads
    assert cache.blocks_to_append(None, 9) == 18
    assert cache.blocks_to_append(None, 8) == 12


# --- 2. paged attention against the dense reference ----------------------------------------

def kept_positions(gen, total, must_keep):
    """A sorted random subset of range(total) that contains must_keep (as after compaction)."""
    chosen = torch.rand(total, generator=gen) < 0.6
    chosen[must_keep] = True
    return torch.nonzero(chosen).flatten().to(torch.int32)


def dense_per_head(q, q_pos, head_kv, group, window):
    """attention_by_position one kv-head at a time (heads hold different positions)."""
    outs = []
    for h, (k, v, pos) in enumerate(head_kv):
        q_h = q[:, h * group:(h + 1) * group]
        outs.append(attention_by_position(q_h, k[:, None], v[:, None], q_pos, pos, window))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("garbage", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("group", [1, 3])
def test_paged_decode_matches_dense(group, window, garbage):
    gen = torch.Generator().manual_seed(group * 10 + (window or 0) + garbage)
    Hkv, d, block_size, B = 2, 8, 4, 3
    totals = [23, 9, 31]  # tokens each sequence has seen; every head keeps a different subset
    heads, q_pos = [], []
    for total in totals:
        row = []
        for _ in range(Hkv):
            pos = kept_positions(gen, total, must_keep=[total - 1])  # the token just written
            row.append((torch.randn(len(pos), d, generator=gen), torch.randn(len(pos), d, generator=gen), pos))
        heads.append(row)
        q_pos.append(total - 1)
    assert len({len(p) for row in heads for _, _, p in row}) > 1, "heads should differ in length"
    k_pool, v_pool, pos_pool, tables, lengths = paged_layout(gen, heads, 40, block_size, d, garbage)
    q = torch.randn(B, 1, Hkv * group, d, generator=gen)
    q_pos = torch.tensor(q_pos)[:, None]
    out = paged_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window)
    assert out.shape == (B, 1, Hkv * group, d)
    for b in range(B):
        ref = dense_per_head(q[b], q_pos[b], heads[b], group, window)
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [7, 600])  # 600: the fused-attention path for long chunks
@pytest.mark.parametrize("garbage", [False, True])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("group", [1, 3])
def test_paged_prefill_matches_dense(group, window, garbage, T):
    gen = torch.Generator().manual_seed(100 + group * 10 + (window or 0) + garbage + T)
    Hkv, d, block_size, total = 2, 8, 4, T + 19
    new = list(range(total - T, total))  # the chunk being prefilled, in the cache already
    heads = [[]]
    for _ in range(Hkv):
        pos = kept_positions(gen, total, must_keep=new)  # an earlier prefix, compressed per head
        heads[0].append((torch.randn(len(pos), d, generator=gen), torch.randn(len(pos), d, generator=gen), pos))
    k_pool, v_pool, pos_pool, tables, lengths = paged_layout(gen, heads, 2 * total // block_size + 10, block_size, d,
                                                             garbage)
    q = torch.randn(1, T, Hkv * group, d, generator=gen)
    q_pos = torch.tensor(new)[None]
    out = paged_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window)
    ref = dense_per_head(q[0], q_pos[0], heads[0], group, window)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    # causal: the first query's output must not change when later keys change
    # the last block of each head holds only its last <= 4 keys, all after the first query
    last_blocks = tables[0, torch.arange(Hkv), (lengths[0] - 1) // block_size]
    v_pool[last_blocks] += 1.0
    again = paged_attention(q, q_pos, k_pool, v_pool, pos_pool, tables, lengths, window)
    torch.testing.assert_close(again[0, 0], out[0, 0], rtol=0, atol=0)


def test_cache_attention_steps_match_dense_after_compaction():
    """StepAttention writes K/V through the cache and attends over it: a two-sequence prefill,
    a per-head compaction, then a batched decode step, each against dense attention."""
    gen = torch.Generator().manual_seed(7)
    layers, Hkv, group, d = 2, 2, 2, 8
    cache = PagedKVCache(layers, Hkv, BlockPool(64, 4, d, torch.float32))
    cache.pool.k[1:] = float("nan")  # never handed out yet: allocation must zero what it hands out
    cache.pool.v[1:] = float("nan")
    lens = [6, 11]
    for s in range(2):
        cache.add(s)
    # what each (seq, layer, head) holds: (k rows, v rows, positions)
    held = {(s, l, h): ([], [], []) for s in range(2) for l in range(layers) for h in range(Hkv)}

    def step(seq_ids, query_lens, positions):
        attn = StepAttention(cache, seq_ids, query_lens, positions)
        T = len(positions)
        for layer in range(layers):
            q = torch.randn(T, Hkv * group, d, generator=gen)
            k = torch.randn(T, Hkv, d, generator=gen)
            v = torch.randn(T, Hkv, d, generator=gen)
            out = attn(layer, q, k, v, None)
            start = 0
            for s, n in zip(seq_ids, query_lens):
                rows = slice(start, start + n)
                for h in range(Hkv):
                    ks, vs, ps = held[s, layer, h]
                    ks += list(k[rows, h]); vs += list(v[rows, h]); ps += positions[rows].tolist()
                dense = dense_per_head(q[rows], positions[rows],
                                       [(torch.stack(held[s, layer, h][0]), torch.stack(held[s, layer, h][1]),
                                         torch.tensor(held[s, layer, h][2])) for h in range(Hkv)], group, None)
                torch.testing.assert_close(out[rows], dense, rtol=1e-5, atol=1e-5)
                start += n

    step([0, 1], lens, torch.cat([torch.arange(n) for n in lens]))
    for s, n in enumerate(lens):
        keep = torch.rand(layers, Hkv, n, generator=gen) < 0.5
        keep[..., -1] = True  # keep the latest token so every query sees at least one key
        cache.compact(s, keep)
        for layer in range(layers):
            for h in range(Hkv):
                idx = torch.nonzero(keep[layer, h]).flatten().tolist()
                held[s, layer, h] = tuple([col[i] for i in idx] for col in held[s, layer, h])
    assert len(set(cache.seqs[1].lengths.flatten().tolist())) > 1
    step([0, 1], [1, 1], torch.tensor([lens[0], lens[1]]))


# --- 3. errors -----------------------------------------------------------------------------

def test_double_free_raises():
    pool = BlockPool(4, 2, 2, torch.float32)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids)
    ids = pool.allocate(1)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(torch.cat([ids, ids]))  # the same block twice in one call
    assert pool.num_free == 3  # the refused calls changed nothing
    with pytest.raises(OutOfBlocks):
        pool.allocate(4)


def test_allocations_are_ascending_neighbouring_blocks():
    """A head's prefill should lie in one run of memory (the CPU decode reads it ~1.5x faster)."""
    pool = BlockPool(16, 2, 2, torch.float32)
    first, second = pool.allocate(5), pool.allocate(3)
    assert first.tolist() == [0, 1, 2, 3, 4] and second.tolist() == [5, 6, 7]
    pool.free(first)
    assert pool.allocate(5).tolist() == [0, 1, 2, 3, 4]  # what one free gave back, in its order
    assert pool.allocate(4).tolist() == [8, 9, 10, 11]


def test_read_slots_gives_each_flat_slot_its_field_on_plain_and_strided_fields():
    """One reader by flat slot (block * block_size + offset) for the host tier's recall and the
    token-level readers: a field whose blocks are rows of one view, and a strided one (a
    quantized pool's, whose fields share byte rows)."""
    from nanokv.cache.pool import row_views
    pool = BlockPool(8, 4, 3, torch.float32)
    pool.fields["k"].copy_(torch.randn(8, 4, 3))
    pool.fields["pos"].copy_(torch.arange(32, dtype=torch.int32).view(8, 4))
    layout = {"pad": (torch.int32, (3,)), "s": (torch.float16, (4, 3))}
    strided = row_views(torch.zeros(8, 100, dtype=torch.uint8), layout)["s"]
    strided.copy_(torch.randn(8, 4, 3))
    pool.fields["s"] = strided
    slots = torch.tensor([[5, 31, 0], [17, 17, 2]])
    assert pool.read_slots(slots, "pos").tolist() == slots.tolist()
    for name, field in (("k", pool.k), ("s", strided)):
        want = [[field[int(s) // 4, int(s) % 4].tolist() for s in row] for row in slots]
        assert pool.read_slots(slots, name).tolist() == want


def test_compact_accepts_a_mask_wider_than_the_sequence():
    cache = PagedKVCache(1, 1, BlockPool(20, 4, 2, torch.float32))
    cache.add(0)
    slots = cache.append_slots(0, 3)
    cache.write(slots[0], torch.arange(6.0).view(3, 1, 2), -torch.arange(6.0).view(3, 1, 2), torch.tensor([7, 8, 9]))
    keep = torch.zeros(1, 1, 40, dtype=torch.bool)  # 40 slots: more than the 4 blocks its table has room for
    keep[0, 0, 1:3] = True
    cache.compact(0, keep)
    assert cache.seqs[0].lengths.tolist() == [[2]]
    block = int(cache.seqs[0].tables[0, 0, 0])
    assert cache.pool.pos[block, :2].tolist() == [8, 9]
    assert cache.pool.k[block, :2].tolist() == [[2.0, 3.0], [4.0, 5.0]]


def test_compact_past_length_raises():
    cache = PagedKVCache(1, 2, BlockPool(8, 4, 2, torch.float32))
    cache.add(0)
    cache.append_slots(0, 5)
    keep = torch.zeros(1, 2, 8, dtype=torch.bool)
    keep[0, 1, 5] = True  # slot 5 of a head holding 5 tokens (0..4)
    used = cache.pool.num_used
    with pytest.raises(ValueError, match="past a head's length"):
        cache.compact(0, keep)
    assert cache.pool.num_used == used and cache.seqs[0].lengths.tolist() == [[5, 5]]


def test_from_memory_too_small_names_the_setting():
    cfg = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=8)
    per_block = 4 * (2 * 8 * 2 + 4)  # 4 tokens: K and V of 8 dims in bfloat16, an int32 position
    enough = 6 * per_block     # one block per (layer, kv-head)
    cache = PagedKVCache.from_memory(cfg, enough, 4, torch.bfloat16)
    assert cache.pool.num_blocks == 6 and cache.pool.total_bytes == enough
    with pytest.raises(ValueError, match="kv_cache_memory"):
        PagedKVCache.from_memory(cfg, enough - 1, 4, torch.bfloat16)
    # a method's per-token state (H2O's float32 score) is part of each block's bytes
    scored = PagedKVCache.from_memory(cfg, 6 * (per_block + 4 * 4), 4, torch.bfloat16, extra_fields={"s": torch.float32})
    assert scored.pool.num_blocks == 6 and scored.pool.bytes_per_block == per_block + 16


# --- 4. compaction returns blocks ----------------------------------------------------------

def test_compaction_frees_whole_blocks():
    cache = PagedKVCache(L, H, BlockPool(100, BS, D, torch.float32))
    for s in range(2):
        cache.add(s)
        cache.append_slots(s, 21)  # 21 tokens: 6 blocks in each of the 6 heads
    assert cache.pool.num_used == 2 * 36
    kept = [[10, 11], [3, 8], [1, 21]]  # about half, different in every head
    keep = torch.zeros(L, H, 21, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for layer in range(L):
        for head in range(H):
            keep[layer, head, torch.randperm(21, generator=gen)[:kept[layer][head]]] = True
    cache.compact(0, keep)
    # ceil(kept / 4) per head: 3 + 3 + 1 + 2 + 1 + 6 = 16 blocks left for sequence 0
    assert cache.pool.num_used == 16 + 36
    assert cache.seqs[0].lengths.tolist() == kept
    assert cache.seqs[0].num_blocks.tolist() == [[3, 3], [1, 2], [1, 6]]
    assert cache.seq_bytes(0) == 16 * BS * (2 * D * 4 + 4)  # K, V (float32) and positions
    assert cache.pool.num_free == 100 - 52


def test_decode_group_of_sequences_with_different_table_capacities():
    """Sequences decoded in one group are padded to the group's longest; a member whose block
    table has less capacity than that must be padded, not break the stack (regression)."""
    torch.manual_seed(0)
    cache = PagedKVCache(1, 1, BlockPool(64, 2, 8, torch.float32))
    lens, held = [7, 9], {}  # 4 and 5 blocks: one group; table capacities 4 and 8
    for s, n in enumerate(lens):
        cache.add(s)
        k, v, pos = torch.randn(n, 1, 8), torch.randn(n, 1, 8), torch.arange(n)
        StepAttention(cache, [s], [n], pos)(0, torch.randn(n, 1, 8), k, v, None)
        held[s] = k, v
    step = StepAttention(cache, [0, 1], [1, 1], torch.tensor(lens))
    assert len(step.groups) == 1
    q, k, v = torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out = step(0, q, k, v, None)
    for s, n in enumerate(lens):
        keys, values = torch.cat([held[s][0], k[s:s + 1]]), torch.cat([held[s][1], v[s:s + 1]])
        ref = attention_by_position(q[s:s + 1], keys, values, torch.tensor([n]), torch.arange(n + 1))
        torch.testing.assert_close(out[s:s + 1], ref, rtol=1e-5, atol=1e-6)
