"""The host tier (cache/host_tier.py) and the Offloader role (methods/base.py), with offloaders made
up here: a layer's older tokens move to host memory at prefill and a block at a time at decode,
their summaries stay on the device at the right slots, recalled picks are attended with the
device window in one softmax, picks that cover the cache give full's tokens exactly, exact top-k
picks give what a plain restatement gives, bytes are counted per tier and per recall, a tight
device pool preempts and recomputes, a full host keeps tokens on the device, and a prompt the
host can never hold is refused with a clear error."""

import math

import pytest
import torch

from helpers import DenseOffloaded, assert_preemption_repeats, keep_released_states, restated_greedy
from nanokv.methods.base import Offloader, Picks, top_slots
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]
WINDOW = 8


class EveryHostPage(Offloader):
    """Every host page (nothing scored): the whole cache is read, part of it recalled."""
    name, description, paper = "every_host_page", "test: recall every host page", ""
    summary_bounds = True
    device_window = WINDOW

    def pick(self, step):
        P = step.bounds[0].shape[2]
        pages = torch.arange(P, device=step.lengths.device).expand(*step.lengths.shape, P)
        return Picks(pages=pages.masked_fill(pages * step.block_size >= step.lengths[..., None], -1))


class TopHostSlots(Offloader):
    """Each kv-head's `budget` host slots of highest q . k (the most over its query heads), scored
    over the host's keys where they are."""
    name, description, paper = "top_host_slots", "test: exact top-k host slots", ""
    device_window = WINDOW

    def pick(self, step):
        keys = step.keys.to(step.queries.device)
        return Picks(slots=top_slots(step.logits(keys).amax(dim=2), self.budget))


class KeyNormSummary(Offloader):
    """Each host token's key norm kept on the device (a summary field); the `budget` of largest norm."""
    name, description, paper = "key_norm_summary", "test: a summary field", ""
    device_window = WINDOW

    def summary_fields(self, head_dim):
        return {"norm": (torch.float32, ())}

    def summarize(self, view):
        view.state["tokens"] = view.state.get("tokens", 0) + view.keys.shape[1]
        return {"norm": view.keys.float().norm(dim=-1)}

    def pick(self, step):
        norm = step.summary("norm").masked_fill(~step.held(), float("-inf"))
        return Picks(slots=top_slots(norm, self.budget))


class RebuiltKeys(Offloader):
    """Every host slot, its key kept whole on the device as a summary and handed back in Picks.keys:
    only values and positions are recalled."""
    name, description, paper = "rebuilt_keys", "test: keys from the device", ""
    device_window = WINDOW

    def summary_fields(self, head_dim):
        return {"key": (torch.float32, (head_dim,))}

    def summarize(self, view):
        return {"key": view.keys}

    def pick(self, step):
        slots = torch.arange(step.slots, device=step.lengths.device).expand(*step.lengths.shape, step.slots)
        slots = slots.masked_fill(~step.held(), -1)
        keys = step.summary("key").gather(2, slots.clamp(min=0)[..., None].expand(-1, -1, -1, step.queries.shape[-1]))
        return Picks(slots=slots, keys=keys)


class Doubled(EveryHostPage):
    """Every host page, each recalled slot weighed twice (log 2 added to its logit)."""
    name = "doubled"

    def pick(self, step):
        picks = super().pick(step)
        slots = picks.pages[..., None] * step.block_size + torch.arange(step.block_size, device=picks.pages.device)
        picks.log_weights = torch.full(slots.flatten(-2).shape, math.log(2.0), device=picks.pages.device)
        return picks


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make(tiny_path, monkeypatch):
    from nanokv import LLM
    from nanokv.methods import METHODS

    for method in (EveryHostPage, TopHostSlots, KeyNormSummary, RebuiltKeys, Doubled):
        monkeypatch.setitem(METHODS, method.name, method)
    return lambda method="full", budget=None, **kw: LLM(str(tiny_path), dtype="float32", method=method,
                                                        budget=budget, **kw)


def greedy(llm, prompts=PROMPTS, steps=16):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def test_recalling_every_host_page_gives_full_exactly_and_moves_what_it_reads(make):
    full = make()
    expected = greedy(full)
    llm = make("every_host_page", budget=1000)
    assert greedy(llm) == expected
    assert llm.stats["peak_host_kv_bytes"] > 0
    assert llm.stats["peak_kv_bytes"] < full.stats["peak_kv_bytes"]
    # one sequence of 40: 15 decode steps, each recalling every host token of 2 layers, 1 kv-head:
    # the prompt's 40 - 8, then a block more once the window holds 8 + 16 (after step 16: none here)
    greedy(llm, PROMPTS[:1], 16)
    assert llm.stats["kv_bytes_moved_per_decode_token"] == 2 * 32 * (2 * 64 * 4 + 4)
    greedy(llm, PROMPTS[:1], 40)  # blocks move at decode too: 32, then 48 from step 17, 64 from step 33
    moved = sum(2 * (32 + 16 * ((t - 1) // 16)) * (2 * 64 * 4 + 4) for t in range(1, 40))
    assert llm.stats["kv_bytes_moved_per_decode_token"] == moved / 39
    assert greedy(llm, PROMPTS[:1], 40) == greedy(full, PROMPTS[:1], 40)


def test_keys_rebuilt_on_the_device_recall_only_values_and_weights_enter_the_softmax(make):
    expected = greedy(make())
    llm = make("rebuilt_keys", budget=1000)
    assert greedy(llm) == expected
    greedy(llm, PROMPTS[:1], 16)
    assert llm.stats["kv_bytes_moved_per_decode_token"] == 2 * 32 * (64 * 4 + 4)  # V and position alone
    # log 2 on every recalled slot: the host part weighs twice, so the tokens change
    assert greedy(make("doubled", budget=1000)) != expected


@pytest.mark.parametrize("method, rank", [
    ("top_host_slots", lambda q, keys: (q @ keys.T).amax(0)),
    ("key_norm_summary", lambda q, keys: keys.norm(dim=-1)),
])
def test_top_k_host_picks_are_read_as_a_plain_restatement_reads_them(make, method, rank):
    llm = make(method, budget=5)
    [got] = greedy(llm, PROMPTS[1:2], 20)  # past a block of decode steps: a block moves to the host
    assert got == restated_greedy(llm.model, DenseOffloaded(len(PROMPTS[1]), WINDOW, 5, rank), PROMPTS[1], 20)


def test_summaries_are_made_once_per_moved_token_and_a_prefill_starts_them_afresh(make):
    llm = make("key_norm_summary", budget=5)
    kept = keep_released_states(llm)
    greedy(llm, PROMPTS[:1], 20)  # 40 - 8 at prefill, 16 at step 16, per layer
    [state] = kept
    assert not llm.runner.read_states
    assert state["tokens"] == 2 * (32 + 16)


def test_a_tight_device_pool_preempts_and_recomputes_every_request(make):
    from nanokv import SamplingParams

    # 12 of each prompt's 20 tokens go to a host that holds 3 prompts' and nothing more, so what
    # decode would move stays on the device, which then runs short
    short = [list(range(10 + i, 30 + i)) for i in range(6)]
    per_block = make("top_host_slots", budget=1000).cache.pool.bytes_per_block
    tight, _ = assert_preemption_repeats(
        lambda **kw: make("top_host_slots", budget=1000, host_cache_memory=8 * per_block, **kw), short,
        SamplingParams(max_tokens=40, ignore_eos=True), blocks=13)
    assert tight.cache.host.num_used == 1 and tight.cache.pool.num_used == 0  # all given back


def test_a_full_host_keeps_tokens_on_the_device(make):
    expected = greedy(make(), PROMPTS[:1], 40)
    llm = make("every_host_page", budget=1000)
    per_block = llm.cache.host.bytes_per_block
    # room for the prompt's 2 layers x 2 blocks (and block 0), none for what decode moves
    small = make("every_host_page", budget=1000, host_cache_memory=5 * per_block)
    assert greedy(small, PROMPTS[:1], 40) == expected
    assert small.stats["peak_host_kv_bytes"] == 4 * per_block


def test_a_prompt_the_host_can_never_hold_is_refused(make):
    llm = make("every_host_page", budget=1000)
    small = make("every_host_page", budget=1000, host_cache_memory=3 * llm.cache.host.bytes_per_block)
    with pytest.raises(ValueError, match="host-tier blocks.*raise host_cache_memory"):
        greedy(small, PROMPTS[2:], 2)
    with pytest.raises(ValueError, match="host_cache_memory must be"):
        make("every_host_page", budget=1000, host_cache_memory=-1)


def test_recall_round_trips_and_attends_as_the_plain_twin():
    from nanokv.cache.host_tier import OffloadedKVCache
    from nanokv.config import ModelConfig
    from nanokv.kernels.reference import attention_by_position

    cfg = ModelConfig("llama", vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64)
    cache = OffloadedKVCache.from_memory(cfg, 1 << 20, 1 << 20, 16, torch.float32, "cpu", {}, False, 4, 0)
    cache.add(0)
    torch.manual_seed(0)
    n = 37
    k, v = torch.randn(n, 1, 32), torch.randn(n, 1, 32)
    cache.write_prefill(0, 0, k, v, torch.arange(n))
    cache.offload(0, 0, n - 4, {})
    assert cache.seqs[0].host_lengths.tolist() == [[33]] and cache.seqs[0].lengths.tolist() == [[4]]
    host_tables, _ = cache.host_held([0], 0)
    slots = torch.tensor([[[30, 2, -1, 17]]])
    got = cache.recall(host_tables, slots)
    assert torch.equal(got["k"][0, 0, :2], k[[30, 2], 0]) and torch.equal(got["pos"][0, 0, 3], torch.tensor(17, dtype=torch.int32))
    q = torch.randn(1, 2, 32)
    tables, lengths = cache.held(0, 0)
    out, _ = cache.attend_recalled(q, torch.tensor([n]), tables, lengths, got, slots >= 0, None)
    index = torch.tensor([2, 17, 30, 33, 34, 35, 36])
    want = attention_by_position(q, k[index], v[index], torch.tensor([n]), index)
    assert torch.allclose(out, want, atol=1e-5)


def test_a_layers_device_width_is_its_own_not_a_kept_layers():
    from nanokv.cache.host_tier import OffloadedKVCache
    from nanokv.config import ModelConfig

    cfg = ModelConfig("llama", vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=128)
    # layer 0 stays whole on the device (skip_layers=1); layer 1 keeps a window of 4
    cache = OffloadedKVCache.from_memory(cfg, 1 << 20, 1 << 20, 16, torch.float32, "cpu", {}, False, 4, 1)
    torch.manual_seed(0)
    for seq, n in enumerate((70, 37)):
        cache.add(seq)
        for layer in (0, 1):
            cache.write_prefill(seq, layer, torch.randn(n, 1, 32), torch.randn(n, 1, 32), torch.arange(n))
        cache.offload(seq, 1, cache.due_offload(seq, 1, prefill=True), {})
    assert cache.device_width([0, 1], 0) == 5                   # 70 tokens: 5 blocks of 16
    assert cache.device_width([0, 1], 1) == 1                   # each keeps its window and under a block more
    assert cache.device_width([1], 0) == 3
    # what attend_recalled reads from the narrower tables is what it reads from the group's wide ones
    wide, lengths = torch.full((2, 1, 5), -1), torch.zeros(2, 1, dtype=torch.int64)
    for seq in (0, 1):
        tables, lengths[seq] = cache.held(seq, 1)
        wide[seq, :, :tables.shape[-1]] = tables[0]
    host_tables, _ = cache.host_held([0, 1], 1)
    slots = torch.tensor([[[0, 5]], [[3, -1]]])
    got = cache.recall(host_tables, slots)
    q, positions = torch.randn(2, 2, 32), torch.tensor([70, 37])
    out_wide, _ = cache.attend_recalled(q, positions, wide, lengths, got, slots >= 0, None)
    out, _ = cache.attend_recalled(q, positions, wide[..., :1], lengths, got, slots >= 0, None)
    assert torch.allclose(out, out_wide, atol=1e-6)
