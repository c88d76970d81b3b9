"""InfiniPot and CItruS (nanokv/methods/infinipot.py, citrus.py): chunked prefill, each chunk followed by
a scoring pass (a catalyst prompt, an instruction) whose attention picks what each layer keeps. On a
hand-built view the picks are known (InfiniPot per kv-head, over its query group; CItruS one choice
for the layer, over all heads); in the engine the tokens and the positions each head holds equal a
plain restatement of chunk-by-chunk prefill (compression=r: the share of what was read, after each
chunk); a question attends over the finished pot; a budget covering the prompt gives `full`'s tokens;
the pot holds fewer bytes than `full`; a tight pool preempts and recomputes; bad options are
refused."""

import math

import pytest
import torch

from helpers import assert_preemption_repeats, generate_holding
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from nanokv.methods.citrus import INSTRUCTION
from nanokv.methods.infinipot import CATALYST
from tiny_model import save_tiny_llama

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]
TEXTS = {"infinipot": CATALYST, "citrus": INSTRUCTION}


# --- hand-built views ------------------------------------------------------------------------

def hand_view():
    """2 kv-heads of D=4 with 6 held keys each, 4 query heads (groups {0, 1} and {2, 3}), and a
    scoring pass of one query whose own key is 0 (logit 0). Query heads 0 and 2 look along
    channel 0, 1 and 3 along channel 1, with weight 4 (logit = 4 * channel / sqrt(4) = 2 * channel).

    kv-head 0: slot 1 (3, 0) and slot 2 (0, 2.5) each draw one head of the group (logits 6, 5);
    slot 3 (2, 2) both, a little (logit 4). kv-head 1: slot 4 (3, 3) draws both of its heads
    (logit 6); slot 5 (2, 0) one (logit 4). The rest is 0 (logit 0)."""
    keys = torch.zeros(2, 6, 4)
    keys[0, 1, 0], keys[0, 2, 1], keys[0, 3, :2] = 3.0, 2.5, 2.0
    keys[1, 4, :2], keys[1, 5, 0] = 3.0, 2.0
    q = torch.zeros(1, 4, 4)
    q[0, 0, 0] = q[0, 1, 1] = q[0, 2, 0] = q[0, 3, 1] = 4.0
    view = PrefillView(0, 2, torch.zeros(8, 4, 4), keys, torch.arange(6))
    view.scoring_queries, view.scoring_keys, view.scoring_lengths = q, torch.zeros(2, 1, 4), [1]
    return view


def test_infinipot_keeps_per_kv_head_what_its_query_group_attends_to_from_the_catalyst():
    view = hand_view()
    # kv-head 0: head 0 gives slot 1 e^6 / (e^6 + e^4 + 5) = 0.87, head 1 gives slot 2 e^5 / (e^5 + e^4 + 5)
    # = 0.70; slot 3 gets 0.12 and 0.27: the group's mean keeps 1 and 2. kv-head 1: slot 4 (0.87, 0.99)
    # and slot 5 (0.12 from head 2) over the rest (about 0.003)
    keep = make_method("infinipot", budget=2).keep_mask(view)
    assert [row.nonzero().flatten().tolist() for row in keep] == [[1, 2], [4, 5]]
    # scores: the catalyst's softmax covers its own key too (a sixth and seventh e^0 in Z)
    scores = make_method("infinipot", budget=2).scores(view)
    z0 = math.exp(6) + math.exp(4) + 5
    assert scores[0, 1].item() == pytest.approx((math.exp(6) / z0 + 1 / (math.exp(5) + math.exp(4) + 5)) / 2, rel=1e-5)
    # a pot that holds everything keeps everything; so does a view with no pass (prompt within budget)
    assert make_method("infinipot", budget=6).keep_mask(view) is None
    view.scoring_queries = None
    assert make_method("infinipot", budget=2).keep_mask(view) is None


def test_citrus_keeps_one_choice_for_all_heads_by_the_mean_over_every_query_head():
    # over all 4 query heads: slot 4 (0.87 + 0.99) / 4 = 0.46, slot 1 (0.87 + ...) / 4 = 0.22, slot 2
    # (0.70 + ...) / 4 = 0.18, slot 3 (0.12 + 0.27) / 4 = 0.10: the top 3 are {1, 2, 4} in both
    # kv-heads (per head, kv-head 1 would have kept 5 before 1 and 2)
    view = hand_view()
    keep = make_method("citrus", budget=3).keep_mask(view)
    assert [row.nonzero().flatten().tolist() for row in keep] == [[1, 2, 4], [1, 2, 4]]
    assert make_method("citrus", budget=1).keep_mask(view).nonzero()[:, 1].tolist() == [4, 4]
    assert make_method("citrus", budget=6).keep_mask(view) is None


def test_the_scoring_pass_is_the_text_and_the_reply_opening_only_when_something_is_dropped():
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    for name, text in TEXTS.items():
        method = make_method(name, budget=8)
        assert method.scoring_passes(list(range(8)), encode, "\n") == []
        assert method.scoring_passes(list(range(9)), encode, "<r>") == [encode(text) + encode("<r>")]
    own = make_method("citrus", budget=8, instruction="Who won?")
    assert own.scoring_passes(list(range(9)), encode, "\n") == [encode("Who won?\n")]
    # the chunk the runner reads the prompt in
    assert make_method("infinipot", budget=8, chunk_size=32).prefill_chunk == 32
    assert make_method("citrus").prefill_chunk == 256 and make_method("citrus").budget == 768
    assert make_method("infinipot").prefill_chunk == 2048 and make_method("infinipot").budget == 2048


@pytest.mark.parametrize("name, options, match", [
    ("infinipot", {"chunk_size": 0}, "chunk_size=0"),
    ("citrus", {"chunk_size": -4}, "chunk_size=-4"),
    ("infinipot", {"catalyst": "  "}, "catalyst"),
    ("citrus", {"instruction": ""}, "instruction"),
    ("citrus", {"window": 3}, "unknown option 'window'"),
    ("citrus", {"budget": 0}, "budget must be a positive"),
    ("infinipot", {"compression": 0.5, "budget": 8}, "not both"),
    ("citrus", {"compression": 1.0}, "compression must be in"),
])
def test_bad_options_are_refused_with_the_valid_choices(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_method(name, **options)


# --- the engine against a plain restatement ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def llm_of(path, method="full", **kw):
    from nanokv import LLM

    return LLM(str(path), dtype="float32", method=method, **kw)


class PlainChunkedPass:
    """The methods stated plainly, per kv-head: each chunk runs over what every head kept of the
    earlier ones, followed by the scoring pass (at the positions after the chunk); the pass's
    queries' softmax over the held keys and its own (causal), averaged over its tokens and over
    the kv-head's group (`per_head`) or all heads, ranks the held tokens, and each head keeps its
    top `keep(tokens read so far)`; the pass's KV goes. What follows (a question, decode) attends
    over what stayed."""

    def __init__(self, keep, pass_len, per_head):
        self.keep, self.m, self.per_head = keep, pass_len, per_head
        self.layers, self.scoring = {}, False

    def __call__(self, layer, q, k, v, sliding_window):
        H, group, D = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
        held = self.layers.get(layer) or [(k[:0, h], v[:0, h], self.positions[:0]) for h in range(H)]
        heads = [(torch.cat([hk, k[:, h]]), torch.cat([hv, v[:, h]]), torch.cat([hp, self.positions]))
                 for h, (hk, hv, hp) in enumerate(held)]
        out = torch.cat([attention_by_position(q[:, h * group:(h + 1) * group], hk[:, None], hv[:, None],
                                               self.positions, hp) for h, (hk, hv, hp) in enumerate(heads)], dim=1)
        if self.scoring:
            S = len(heads[0][0]) - self.m
            probs = []  # [Hq, S]: each query head's pass attention to the held tokens
            for h, (hk, _, hp) in enumerate(heads):
                for j in range(h * group, (h + 1) * group):
                    logits = (q[-self.m:, j].float() @ hk.float().T) / math.sqrt(D)      # [m, S + m]
                    logits[hp[None, :] > self.positions[-self.m:, None]] = float("-inf")
                    probs.append(logits.softmax(-1)[:, :S].mean(0))
            probs = torch.stack(probs)
            score = probs.view(H, group, S).mean(1) if self.per_head else probs.mean(0).expand(H, S)
            heads = [(hk[:S], hv[:S], hp[:S]) for hk, hv, hp in heads]
            k = self.keep(int(self.positions[-self.m - 1]) + 1)
            if S > k:
                heads = [(hk[keep], hv[keep], hp[keep]) for (hk, hv, hp), keep in
                         zip(heads, score.topk(k, dim=-1).indices.sort(dim=-1).values)]
        self.layers[layer] = heads
        return out


@torch.inference_mode()
def restated(model, prompt, question, pass_ids, budget, chunk, per_head, steps):
    """-> (greedy tokens, [layer][head] sorted positions held at the end). budget: an int, or a
    function of the tokens read so far."""
    attention = PlainChunkedPass(budget if callable(budget) else lambda read: budget, len(pass_ids), per_head)
    attention.scoring = True
    for start in range(0, len(prompt), chunk):
        part = prompt[start:start + chunk]
        end = start + len(part)
        attention.positions = torch.arange(start, end + len(pass_ids))  # the chunk, then the pass after it
        hidden = model(torch.tensor(part + pass_ids), attention.positions, attention)[len(part) - 1:len(part)]
    attention.scoring, tokens, ids, at = False, [], question, len(prompt)
    for _ in range(steps):
        if ids:
            attention.positions = torch.arange(at, at + len(ids))
            hidden = model(torch.tensor(ids), attention.positions, attention)[-1:]
            at += len(ids)
        tokens.append(int(model.compute_logits(hidden)[0].argmax()))
        ids = tokens[-1:]
    # the last token is sampled, never fed: the engine holds the ones before it
    held = [sorted(hp.tolist()) for layer in sorted(attention.layers) for _, _, hp in attention.layers[layer]]
    return tokens, held


@pytest.mark.parametrize("name", ["infinipot", "citrus"])
@pytest.mark.parametrize("model", ["llama", "gqa"])
def test_tokens_and_held_positions_equal_a_plain_restatement(tiny_path, tiny_gqa_dir, name, model):
    path = tiny_path if model == "llama" else tiny_gqa_dir
    budget, chunk, steps = 24, 16, 10
    llm = llm_of(path, name, budget=budget, chunk_size=chunk)
    pass_ids = llm.tokenizer.encode(TEXTS[name] + "\n", add_special_tokens=False)
    for prompt in (PROMPTS[2], PROMPTS[0][:20] + PROMPTS[2][:5]):  # 100 tokens: 7 chunks; 25: 2 chunks
        got, held = generate_holding(llm, prompt, steps)
        expected, expected_held = restated(llm.model, prompt, [], pass_ids, budget, chunk, name == "infinipot", steps)
        assert got == expected
        assert held == expected_held
        assert all(len(h) == budget + steps - 1 for h in held)  # the pot, then the generated tokens
    if model == "gqa":  # InfiniPot picks per kv-head; CItruS once for the layer
        layers = [held[i:i + 2] for i in range(0, len(held), 2)]
        assert any(a != b for a, b in layers) == (name == "infinipot")
    assert got != [o.token_ids for o in llm_of(path).generate([prompt], sampling(steps))][0]


def sampling(steps):
    from nanokv import SamplingParams

    return SamplingParams(max_tokens=steps, ignore_eos=True)


@pytest.mark.parametrize("name", ["infinipot", "citrus"])
def test_compression_keeps_the_share_of_what_was_read_after_each_chunk(tiny_gqa_dir, name):
    # 75 tokens in chunks of 16: after the chunk ending at 32, 16 stay; at 48, 24; ...; at 75, 38
    llm = llm_of(tiny_gqa_dir, name, compression=0.5, chunk_size=16)
    pass_ids = llm.tokenizer.encode(TEXTS[name] + "\n", add_special_tokens=False)
    got, held = generate_holding(llm, PROMPTS[1], 6)
    assert (got, held) == restated(llm.model, PROMPTS[1], [], pass_ids, lambda read: math.ceil(read / 2), 16,
                                   name == "infinipot", 6)
    assert all(len(h) == 38 + 5 for h in held)


@pytest.mark.parametrize("name", ["infinipot", "citrus"])
def test_a_question_after_the_context_attends_over_the_finished_pot(tiny_path, name):
    llm = llm_of(tiny_path, name, budget=20, chunk_size=16)
    pass_ids = llm.tokenizer.encode(TEXTS[name] + "\n", add_special_tokens=False)
    context, question = PROMPTS[1], [5, 6, 7]
    [out] = llm.generate([(context, question)], sampling(8))
    assert out.token_ids == restated(llm.model, context, question, pass_ids, 20, 16, name == "infinipot", 8)[0]


@pytest.mark.parametrize("name", ["infinipot", "citrus"])
def test_a_budget_covering_the_prompt_gives_full_exactly_and_a_small_pot_holds_fewer_bytes(tiny_path, name):
    full = llm_of(tiny_path)
    expected = [o.token_ids for o in full.generate(PROMPTS, sampling(12))]
    roomy = llm_of(tiny_path, name, budget=100, chunk_size=16)  # chunked, nothing ever dropped
    assert [o.token_ids for o in roomy.generate(PROMPTS, sampling(12))] == expected
    # one 100-token prompt: full holds 100 + 11 tokens a layer (7 blocks of 16); a pot of 24, 24 + 11 (3)
    full.generate(PROMPTS[2:], sampling(12))
    pot = llm_of(tiny_path, name, budget=24, chunk_size=16)
    pot.generate(PROMPTS[2:], sampling(12))
    assert full.stats["peak_kv_bytes"] == 2 * 7 * full.cache.pool.bytes_per_block
    assert pot.stats["peak_kv_bytes"] == 2 * 3 * pot.cache.pool.bytes_per_block


@pytest.mark.parametrize("name", ["infinipot", "citrus"])
def test_a_tight_pool_preempts_and_recomputes_every_request(tiny_path, name):
    assert_preemption_repeats(lambda **kw: llm_of(tiny_path, name, budget=24, chunk_size=16, **kw), PROMPTS,
                              sampling(30), blocks=22)
