"""RocketKV (issue 29, wave 6 group c): SnapKV++ at prefill, then hybrid sparse attention at decode.
The pick on hand-built page bounds where the right page is known (the bound on the group's sign,
the top-r channels, the group's softmaxes summed), SnapKV++'s share of the budget and what the
prompt keeps, the options, and the engine's greedy tokens against a plain restatement of both
stages; a budget covering the context gives `full`'s tokens; the bytes read fall with the budget."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import held_positions, restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView, ReadStep

sys.path.insert(0, str(Path(__file__).parent))


def read_step(queries, kmin, kmax, lengths, block_size):
    """A ReadStep of one layer over hand-built page bounds [b, H, P, D] (the reader reads "bounds")."""
    b, H = lengths.shape
    return ReadStep(layer=0, num_layers=1, queries=queries, positions=lengths[:, 0] - 1, lengths=lengths,
                    block_size=block_size, itemsize=4, states=[{} for _ in range(b)], step_state={},
                    bounds=(kmin, kmax))


# --- the decode pick ----------------------------------------------------------------------------

def test_each_head_reads_the_page_whose_bound_on_its_groups_sign_is_highest():
    # D = 2, pages of 4, 3 pages held, budget 8: (8 // 2) // 4 = 1 page read. Head 0's group points
    # along +c0, so each page counts its largest c0: page 1 (5). Head 1's group points along -c0,
    # so each page counts its smallest c0: page 0 (-5, the largest upper bound 5 of -q.k).
    kmin = torch.zeros(1, 2, 3, 2)
    kmax = torch.zeros(1, 2, 3, 2)
    kmax[0, :, 1, 0] = 5.0
    kmin[0, :, 0, 0] = -5.0
    q = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]]])   # [b, Hq = 4, D]
    method = make_method("rocketkv", budget=8, window_size=1)
    picks = method.pick(read_step(q, kmin, kmax, torch.tensor([[12, 12]]), 4))
    assert picks.pages.tolist() == [[[1], [0]]]
    # both heads score all 3 pages on r = 2 channels (round(2 * 4 / 1.5) capped at D) of one bound each
    assert int(picks.scored_bytes) == 2 * 3 * 2 * 4


def test_only_the_top_r_channels_of_the_groups_query_are_scored():
    # D = 4, pages of 4, budget 8, 64 tokens held: c2 = 8, r = round(4 * 4 / 8) = 2 channels, those
    # where the group's |q| is largest: c0 and c1. Page 3 bounds only c2 (at 100: 0.1 * 100 = 10
    # over every channel), page 5 only c0 (3 * 1 = 3): on c0, c1 page 5 is the only one above 0.
    kmin = torch.zeros(1, 1, 16, 4)
    kmax = torch.zeros(1, 1, 16, 4)
    kmax[0, 0, 3, 2] = 100.0
    kmax[0, 0, 5, 0] = 1.0
    q = torch.tensor([[[3.0, 2.0, 0.1, 0.1]]])
    method = make_method("rocketkv", budget=8, window_size=1)
    picks = method.pick(read_step(q, kmin, kmax, torch.tensor([[64]]), 4))
    assert picks.pages.tolist() == [[[5]]]
    assert int(picks.scored_bytes) == 16 * 2 * 4   # 16 pages, 2 channels of one bound, float32


def test_the_groups_softmaxes_are_summed_not_its_logits_maxed():
    # D = 2, 3 full pages of 4, one page read. Head A: page 0 at 10, page 1 at 9.9 (over sqrt(2));
    # head B: page 1 at 5, the rest 0. Quest's max of the logits would take page 0; summed softmaxes
    # give page 1 about 0.48 + 0.94 against page 0's 0.52 + 0.03.
    kmax = torch.tensor([[10.0, 0.0], [9.9, 5.0], [0.0, 0.0]])[None, None]
    kmin = kmax - 1
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    method = make_method("rocketkv", budget=8, window_size=1)
    assert method.pick(read_step(q, kmin, kmax, torch.tensor([[12]]), 4)).pages.tolist() == [[[1]]]


def test_a_partial_page_counts_its_tokens_once_each_in_the_softmax():
    # Pages 0, 1 of 4 tokens and page 2 of 1, two pages read. Logits (after the sqrt(2)): head A
    # 2.5, 0, 6; head B 0, 0.1, -20. Each token's probability is e^x / sum over tokens: head A's
    # norm 4 e^2.5 + 4 + e^6 = 456, head B's 4 + 4 e^0.1 = 8.4. Page 2 tops (0.88); then page 0
    # (0.027 + 0.119 = 0.146) over page 1 (0.002 + 0.131 = 0.133). Counting each page once (a
    # softmax over pages) would weigh head B four times as much and take page 1 (0.50 vs 0.53).
    kmax = torch.tensor([[2.5, 0.0], [0.0, 0.1], [6.0, -20.0]])[None, None] * math.sqrt(2)
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    method = make_method("rocketkv", budget=16, window_size=1)
    picks = method.pick(read_step(q, kmax - 1, kmax, torch.tensor([[9]]), 4))
    assert picks.pages.tolist() == [[[2, 0]]]


def test_a_head_holding_no_more_pages_than_it_reads_reads_all_unscored():
    # budget 16, pages of 4: 2 pages read; a head holding 8 tokens has just those 2
    kmin, kmax = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    method = make_method("rocketkv", budget=16, window_size=1)
    picks = method.pick(read_step(torch.ones(1, 1, 2), kmin, kmax, torch.tensor([[8]]), 4))
    assert sorted(picks.pages[0, 0].tolist()) == [0, 1] and int(picks.scored_bytes) == 0


# --- SnapKV++ at prefill -------------------------------------------------------------------------

def test_snapkv_plus_plus_keeps_n_over_c_to_the_a_tokens():
    method = make_method("rocketkv", budget=256)
    # c = 16, a = 0.2 + 0.06 * 4 = 0.44: 4096 / 16^0.44 = 1209.3
    assert method.layer_budget(4096, 0, 2) == 1209
    # c = 6.25, a = 0.2 + 0.06 log2 6.25 = 0.3586: 100 / 6.25^0.3586 = 51.8
    assert make_method("rocketkv", budget=16, window_size=4).layer_budget(100, 0, 2) == 51
    assert method.layer_budget(200, 1, 2) == 200   # within budget: c = 1, nothing goes
    skipping = make_method("rocketkv", budget=256, skip_layers=1)
    assert skipping.kept_after_prefill(4096, 0, 2) == 4096 and skipping.kept_after_prefill(4096, 1, 2) == 1209


def test_snapkv_plus_plus_keeps_the_window_and_what_the_groups_window_attends_to_most():
    # 12 tokens, budget 4: keep int(12 / 3^0.2951) = 8: the window of 2 and 6 of the 10 prefix
    # tokens. Keys along c0 with weights w; the window's queries along +c0 (head 0) and -c0 (head
    # 1, which attends most to the most negative w). kernel_size 1: no pooling. Summed over the
    # group, the prefix ranks by |w| with the sign's heads weighing alike.
    w = torch.tensor([4.0, 0.0, -6.0, 1.0, 0.5, 5.0, -2.0, 3.0, 0.2, -1.5, 0.0, 0.0])
    keys = torch.zeros(1, 12, 4)
    keys[0, :, 0] = w
    queries = torch.zeros(12, 2, 4)
    queries[:, 0, 0], queries[:, 1, 0] = 2.0, -2.0
    view = PrefillView(layer=0, num_layers=1, queries=queries, keys=keys, positions=torch.arange(12))
    method = make_method("rocketkv", budget=4, window_size=2, kernel_size=1)
    keep = method.keep_mask(view)
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 3, 5, 6, 7, 10, 11]   # |w|: 6, 5, 4, 3, 2, 1


def test_snapkv_plus_plus_pools_the_groups_summed_attention():
    # As above, but one token per head stands out: w = 6 at token 2 (head 0 attends to it), -6 at
    # token 7 (head 1). Max-pooled with kernel 3, each peak lifts its neighbours to its own score:
    # the 6 prefix tokens kept are 1, 2, 3 and 6, 7, 8.
    keys = torch.zeros(1, 12, 4)
    keys[0, 2, 0], keys[0, 7, 0] = 6.0, -6.0
    queries = torch.zeros(12, 2, 4)
    queries[:, 0, 0], queries[:, 1, 0] = 2.0, -2.0
    view = PrefillView(layer=0, num_layers=1, queries=queries, keys=keys, positions=torch.arange(12))
    keep = make_method("rocketkv", budget=4, window_size=2, kernel_size=3).keep_mask(view)
    assert keep[0].nonzero().flatten().tolist() == [1, 2, 3, 6, 7, 8, 10, 11]


# --- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"compression": 0.5}, "give --budget"),
    ({"budget": 32}, "budget=32 must exceed window_size=32"),
    ({"budget": 64, "kernel_size": 8}, "kernel_size=8 of method 'rocketkv' must be an odd integer >= 1"),
    ({"budget": 64, "skip_layers": -1}, "skip_layers=-1 of method 'rocketkv' must be an integer >= 0"),
    ({"budget": 64, "window_size": 0}, "window_size=0 of method 'rocketkv' must be an integer >= 1"),
    ({"budget": 64, "page_size": 4}, "unknown option 'page_size' for method 'rocketkv'; valid: window_size"),
])
def test_bad_options_are_named_with_their_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method("rocketkv", **kwargs)


def test_defaults_and_the_registry_treat_it_as_a_budget_only_reader_that_evicts():
    from nanokv.eval.grid import settings
    from nanokv.methods import selects_pages

    method = make_method("rocketkv")
    assert (method.budget, method.window_size, method.kernel_size, method.skip_layers) == (1024, 32, 63, 0)
    assert method.selects_pages and method.selects_tokens and method.compresses
    assert method.cache_request(2, 64).key_bounds   # the pages' key bounds are kept in the pool
    assert selects_pages("rocketkv")
    assert [s.label for s in settings(["rocketkv"], [0.5], [128])] == ["rocketkv@128tok"]
    with pytest.raises(ValueError, match="combine an eviction method with a quantization method"):
        make_method("rocketkv+kivi", budget=128)


# --- in the engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    """A 2-layer random Llama with 4 query heads over 2 kv-heads of 32 and a byte tokenizer."""
    import transformers as T
    from tiny_model import save_tiny_llama

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-gqa"))
    torch.manual_seed(1)
    config = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                           max_position_embeddings=256)
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    return str(path)


class DenseRocketKV:
    """RocketKV stated plainly, as the model's attention callable. The prompt attends densely; then
    each kv-head keeps int(n / c^a) tokens: its window and the prefix tokens with the highest window
    attention (softmax by position, summed over the window and the group), max-pooled. A decode step
    appends the new token, splits each head's held tokens into pages of `page` in order and, past
    (B // 2) // page pages, scores each page on the r channels of largest group |q| by the bound on
    the group's sign, each query head's logits over sqrt(D sum_r |q| / sum |q|), softmax over the
    held tokens (each repeating its page's logit), summed over the group; attends the top pages."""

    def __init__(self, budget, window, kernel, page):
        self.budget, self.window, self.kernel, self.page = budget, window, kernel, page
        self.layers = {}

    def __call__(self, layer, q, k, v, sliding_window):
        H, D = k.shape[1:]
        g = q.shape[1] // H
        if len(q) > 1:
            out = attention_by_position(q, k, v, self.positions, self.positions)
            self.layers[layer] = [self.snapkv_plus_plus(q[:, h * g:(h + 1) * g], k[:, h], v[:, h]) for h in range(H)]
            return out
        out = []
        for h, held in enumerate(self.layers[layer]):
            held[0], held[1] = torch.cat([held[0], k[:, h]]), torch.cat([held[1], v[:, h]])
            held[2] = torch.cat([held[2], self.positions])
            keys, values, pos = held
            qh = q[:, h * g:(h + 1) * g]
            index = self.hybrid_sparse_pick(qh[0].float(), keys.float())
            out.append(attention_by_position(qh, keys[index, None], values[index, None], self.positions, pos[index]))
        return torch.cat(out, dim=1)

    def snapkv_plus_plus(self, q, k, v):
        n, D = k.shape
        c = max(1.0, n / self.budget)
        keep = min(n, int(n / c ** min(0.2 + 0.06 * math.log2(c), 0.8)))
        index = torch.arange(n)
        if keep < n:
            w = self.window
            logits = torch.einsum("wgd,sd->gws", q[-w:].float(), k.float()) / math.sqrt(D)
            future = self.positions[None, :] > self.positions[-w:, None]
            attention = logits.masked_fill(future, float("-inf")).softmax(-1).sum((0, 1))[:n - w]
            pooled = F.max_pool1d(attention[None, None], self.kernel, 1, self.kernel // 2)[0, 0]
            index = torch.cat([pooled.topk(keep - w).indices.sort().values, torch.arange(n - w, n)])
        return [k[index], v[index], self.positions[index]]

    def hybrid_sparse_pick(self, q, keys):
        (n, D), B, page = keys.shape, self.budget, self.page
        pages = [(a, min(a + page, n)) for a in range(0, n, page)]
        want = max(1, B // 2 // page)
        chosen = range(len(pages))
        if len(pages) > want:
            r = min(D, max(1, round(D * page * B / max(n, B))))
            channels = q.abs().sum(0).topk(r).indices
            positive = q.sum(0)[channels] > 0
            bounds = torch.stack([torch.where(positive, keys[a:b, channels].amax(0), keys[a:b, channels].amin(0))
                                  for a, b in pages])                                    # [P, r]
            temperature = (D * q[:, channels].abs().sum(-1) / q.abs().sum(-1)).sqrt()    # [g]
            per_token = (q[:, channels] @ bounds.t()).repeat_interleave(page, dim=-1)[:, :n]
            probs = (per_token / temperature[:, None]).softmax(-1).sum(0)               # [n]
            score = [float(probs[a]) for a, _ in pages]
            chosen = sorted(sorted(range(len(pages)), key=lambda p: -score[p])[:want])
        return torch.cat([torch.arange(*pages[p]) for p in chosen])


def engine(path, method="full", **options):
    from nanokv import LLM

    return LLM(path, dtype="float32", method=method, **options)


PROMPT = [(j * 37 + 11) % 256 for j in range(100)]


@pytest.mark.parametrize("budget, page", [(16, 2), (24, 4)])
def test_engine_matches_a_plain_statement_of_rocketkv(tiny_gqa, budget, page):
    # (16, 2): the prompt keeps 51 of 100, then r = round(32 * 2 * 16 / 51..81) = 20..13 of 32
    # channels, 4 pages of 2; (24, 4): keeps 63, r = D, 3 pages of 4. No pooling (kernel_size 1):
    # a max-pool copies a peak's score to its neighbours, whose exact ties topk breaks its own way.
    from nanokv import SamplingParams

    steps = 30
    llm = engine(tiny_gqa, "rocketkv", budget=budget, block_size=page, window_size=4, kernel_size=1)
    [out] = llm.generate([PROMPT], SamplingParams(max_tokens=steps, ignore_eos=True))
    tokens = restated_greedy(llm.model, DenseRocketKV(budget, 4, 1, page), PROMPT, steps)
    assert out.token_ids == tokens


def test_the_pages_key_bounds_are_those_of_the_tokens_snapkv_plus_plus_kept(tiny_gqa):
    from nanokv import SamplingParams
    from nanokv.cache.kv_cache import gather_blocks

    llm = engine(tiny_gqa, "rocketkv", budget=16, block_size=4, window_size=4, kernel_size=5)
    checked, finish = [], llm.scheduler.finish

    def check(seq):
        cache, s = llm.cache, llm.cache.seqs[seq.id]
        kmin, kmax = cache.key_bounds()
        assert held_positions(cache, seq.id)[0][0] != list(range(len(PROMPT) + 3))   # it evicted
        for layer in range(2):
            for head in range(2):
                n, table = int(s.lengths[layer, head]), s.tables[layer, head]
                keys = gather_blocks(cache.pool.k, table[None, None, :(n + 3) // 4].to(cache.pool.device))[0, 0, :n]
                for j in range(-(-n // 4)):
                    held = keys[4 * j:4 * j + 4]
                    assert torch.equal(kmin[table[j]], held.amin(0)) and torch.equal(kmax[table[j]], held.amax(0))
                    checked.append(j)
        finish(seq)

    llm.scheduler.finish = check
    llm.generate([PROMPT], SamplingParams(max_tokens=4, ignore_eos=True))
    assert checked


def test_a_budget_covering_the_context_is_full_and_reads_fall_with_the_budget(tiny_gqa):
    from nanokv import SamplingParams

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [PROMPT[:40], PROMPT[:75], PROMPT, PROMPT[10:70]]   # batched, each its own length
    full = engine(tiny_gqa)
    expected = [o.token_ids for o in full.generate(prompts, params)]
    read = {}
    for budget in (256, 64, 32):
        llm = engine(tiny_gqa, "rocketkv", budget=budget, window_size=8)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        read[budget] = llm.stats["kv_bytes_read_per_decode_token"]
        if budget == 256:   # no prompt over 256, and 8 pages of 16 cover 115 tokens: every page, unscored
            assert got == expected
    assert read[256] == full.stats["kv_bytes_read_per_decode_token"] > read[64] > read[32]
    assert read[32] < 0.5 * read[256]


@pytest.mark.slow
def test_engine_matches_a_plain_statement_on_real_weights(smollm2_gguf):
    # SmolLM2-135M: 9 query heads over 3 kv-heads of 64, 30 layers. 300 tokens, budget 32: the
    # prompt keeps int(300 / 9.375^0.394) = 124, then 8 pages of 2 on r = round(64 * 2 * 32 / 125..)
    # = 33 channels, falling to 29 by the last step
    from nanokv import SamplingParams

    prompt, steps = list(range(1000, 1300)), 16
    llm = engine(str(smollm2_gguf), "rocketkv", budget=32, block_size=2, window_size=16, kernel_size=1)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    assert out.token_ids == restated_greedy(llm.model, DenseRocketKV(32, 16, 1, 2), prompt, steps)
