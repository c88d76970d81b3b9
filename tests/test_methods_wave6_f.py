"""LServe (nanokv/methods/lserve.py): the pick on hand-built page bounds (a physical page by the
highest bound of its logical pages, the group's highest query, the newest page always, the whole
history while it fits the budget, a selection reused between re-selections, streaming heads'
sinks and recent pages, the bounds' bytes only when ranking); which heads stream; option errors;
and in the engine under continuous batching: a plain restatement's tokens, `full`'s where the
budget and the streaming window cover the context, and bytes read falling with the budget."""

import math

import pytest
import torch

from helpers import DenseLayers, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import ReadStep


def lserve(scores=None, **options):
    method = make_method("lserve", **options)
    if scores is not None:
        method.bind_calibration({"head_scores": scores})
    return method


def read_step(kmax, length, position=None, queries=None, states=None, kmin=None, block_size=2, layer=0):
    """One sequence at one layer: bounds [H, pages, D] (kmin 0 unless given), `length` tokens per head."""
    H, nb, D = kmax.shape
    queries = torch.tensor([[1.0, 0.0]] * H) if queries is None else queries
    kmin = torch.zeros_like(kmax) if kmin is None else kmin
    return ReadStep(layer, 1, queries[None], torch.tensor([length - 1 if position is None else position]),
                    torch.full((1, H), length), block_size, 4, [{}] if states is None else states, {},
                    bounds=(kmin[None], kmax[None]))


def picked(picks, head=0):
    return [p for p in picks.pages[0, head].tolist() if p >= 0]


# 24 tokens in 12 logical pages of 2, 6 physical pages of 4 (logical_pages=2)
PAGES = 12


def bounds_with(*peaks, H=1, D=2, pages=PAGES):
    """kmax [H, pages, D]: 0 but (head, logical page, channel, value) peaks."""
    kmax = torch.zeros(H, pages, D)
    for h, page, c, value in peaks:
        kmax[h, page, c] = value
    return kmax


def test_a_physical_page_ranks_by_its_best_logical_page_and_the_newest_is_always_read():
    # physical page 1 holds one logical page of bound 5 (page 2); page 3 two of 3 (pages 6, 7): by
    # the max page 1 wins (a sum would pick page 3); the newest physical page (5) comes with it
    method = lserve(static_sparsity=0, budget=8, logical_pages=2, min_pages=2)
    step = read_step(bounds_with((0, 2, 0, 5.0), (0, 6, 0, 3.0), (0, 7, 0, 3.0)), 24)
    picks = method.pick(step)
    assert picked(picks) == [2, 3, 10, 11]
    assert int(picks.scored_bytes) == PAGES * 2 * 2 * 4  # every held page's min and max, float32


def test_the_group_reads_what_its_highest_query_head_bounds():
    # query heads [1, 0] and [0, 1] share the kv-head: page 4's bound comes from the second one
    method = lserve(static_sparsity=0, budget=8, logical_pages=2, min_pages=2)
    kmax = bounds_with((0, 2, 0, 1.0), (0, 4, 1, 4.0))
    picks = method.pick(read_step(kmax, 24, queries=torch.tensor([[1.0, 0.0], [0.0, 1.0]])))
    assert picked(picks) == [4, 5, 10, 11]


def test_the_whole_history_is_read_while_it_fits_the_budget():
    method = lserve(static_sparsity=0, budget=8, logical_pages=2, min_pages=2)
    kmax = bounds_with((0, 2, 0, 5.0))
    picks = method.pick(read_step(kmax, 9))                 # 8 tokens before the query: all 5 pages, no ranking
    assert picked(picks) == [0, 1, 2, 3, 4] and int(picks.scored_bytes) == 0
    picks = method.pick(read_step(kmax, 10))                # 9: the newest physical page (2) and one other
    assert picked(picks) == [2, 3, 4]


def test_a_selection_is_reused_until_the_next_multiple_of_the_interval():
    method = lserve(static_sparsity=0, budget=8, logical_pages=2, min_pages=2, interval=4)
    states = [{}]
    first = bounds_with((0, 2, 0, 5.0), pages=13)
    other = bounds_with((0, 6, 0, 5.0), pages=13)                   # a query that would now pick physical page 3
    picks = method.pick(read_step(first, 21, states=states))  # position 20: selects
    assert picked(picks) == [2, 3, 10] and int(picks.scored_bytes) > 0
    for length in (22, 23, 24):                             # positions 21-23 reuse it and read no bounds
        picks = method.pick(read_step(other, length, states=states))
        assert picked(picks) == [2, 3, *range(10, (length + 1) // 2)] and int(picks.scored_bytes) == 0
    picks = method.pick(read_step(other, 25, states=states))  # position 24 selects again
    assert picked(picks) == [6, 7, 12] and int(picks.scored_bytes) == 13 * 2 * 2 * 4


def test_a_reused_selection_also_reads_a_newest_page_opened_since():
    method = lserve(static_sparsity=0, budget=8, logical_pages=2, min_pages=2, interval=5)
    states = [{}]
    kmax = bounds_with((0, 2, 0, 5.0), pages=13)
    picks = method.pick(read_step(kmax, 21, states=states))  # position 20: physical pages 1 and 5
    assert picked(picks) == [2, 3, 10]
    picks = method.pick(read_step(kmax, 25, states=states))  # position 24, reused: physical page 6 opened
    assert picked(picks) == [2, 3, 10, 11, 12] and int(picks.scored_bytes) == 0


def test_streaming_heads_read_their_sinks_and_recent_pages_and_no_bounds():
    # kv-head 0 streams (the lower score); sinks: slots 0-1 (page 0), recent: slots 19-23 (pages 9-11)
    method = lserve([[0.1, 0.9]], budget=8, logical_pages=2, min_pages=2, sink_size=2, local_size=5)
    kmax = bounds_with((0, 4, 0, 9.0), (1, 2, 0, 5.0), H=2)
    picks = method.pick(read_step(kmax, 24))
    assert picked(picks, 0) == [0, 9, 10, 11]
    assert picked(picks, 1) == [2, 3, 10, 11]
    assert int(picks.scored_bytes) == PAGES * 2 * 2 * 4   # the retrieval head's bounds alone


def test_the_lowest_scoring_heads_of_the_model_stream_as_the_official_quantile_gives():
    scores = [[0.3, 0.1], [0.2, 0.4], [0.5, 0.6]]
    # share 0.5 of 6: the median 0.35 -> 0.1, 0.2, 0.3 stream; share 0.2: quantile 0.2 -> only 0.1
    assert lserve(scores).streaming.tolist() == [[True, True], [True, False], [False, False]]
    assert lserve(scores, static_sparsity=0.2).streaming.tolist() == [[False, True], [False, False], [False, False]]
    assert lserve(scores, static_sparsity=1).streaming.all()
    assert make_method("lserve", static_sparsity=0).calibration is None   # no head streams: nothing to load
    assert make_method("lserve").calibration == "duoattention" and make_method("lserve").budget == 4096


@pytest.mark.parametrize("options, message", [
    ({"static_sparsity": 1.5}, r"option static_sparsity=1.5 of method 'lserve' must be a number in \[0, 1\]"),
    ({"interval": 0}, r"option interval=0 of method 'lserve' must be an integer >= 1"),
    ({"logical_pages": "x"}, r"option logical_pages='x' of method 'lserve' must be int, an integer >= 1"),
    ({"compression": 0.5}, r"give --budget .* not --compression=0.5"),
    ({"budget": 0}, r"budget must be a positive number of tokens, got 0"),
    ({"window": 4}, r"unknown option 'window' for method 'lserve'; valid: static_sparsity, sink_size"),
])
def test_bad_options_are_named_with_their_valid_range(options, message):
    with pytest.raises(ValueError, match=message):
        make_method("lserve", **options)


def test_streaming_without_a_calibration_says_how_to_make_one():
    with pytest.raises(ValueError, match="python -m nanokv.calibrate duoattention, or give static_sparsity=0"):
        make_method("lserve").pick(read_step(bounds_with(), 24))


# --- in the engine ----------------------------------------------------------------------------

BLOCK, LOGICAL, SINK, LOCAL = 4, 4, 4, 12   # physical pages of 16 tokens
PROMPTS = [list(range(20, 20 + n)) for n in (50, 93, 71)]
SCORES = [[0.2, 0.7], [0.9, 0.4]]           # static_sparsity 0.5: kv-head 0 of layer 0, 1 of layer 1 stream


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    """A tiny random Llama with 4 query heads over 2 kv-heads (so a layer holds both kinds of head),
    a byte tokenizer, and a duoattention artifact for it -> (path, artifact path)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nanokv.artifacts import model_key, write_artifact

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                           max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-gqa")
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={b: i for i, b in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    (path / "tokenizer.json").write_text(backend.to_str())
    artifact = path / "duoattention.json"
    write_artifact(artifact, {"format": 1, "method": "duoattention", "model": model_key(str(path)), "num_layers": 2,
                              "num_kv_heads": 2, "head_scores": SCORES})
    return path, artifact


def engine(tiny_gqa, budget, **options):
    from nanokv import LLM

    path, artifact = tiny_gqa
    options = {"sink_size": SINK, "local_size": LOCAL, "logical_pages": LOGICAL, **options}
    if options.get("static_sparsity", 0.5):
        options["calibration_file"] = str(artifact)
    return LLM(str(path), dtype="float32", method="lserve", budget=budget, block_size=BLOCK, **options)


class DenseLServe(DenseLayers):
    """LServe stated plainly, as the model's attention callable: every layer keeps all its keys. A
    decode step: a streaming head attends over the blocks of BLOCK tokens holding its first SINK
    and newest LOCAL tokens; a retrieval head over physical pages of LOGICAL blocks, chosen when
    the query's position is a multiple of `interval` (or at its first step), reused between, with
    the newest page always: all of them while the tokens before the query are at most `budget`,
    else the newest and the K - 1 others whose best block has the highest max over the query
    heads of sum_c max(q_c max_c, q_c min_c), K = max(3, budget // page tokens)."""

    def __init__(self, streaming, budget, interval=4):
        super().__init__()
        self.streaming, self.budget, self.interval = streaming, budget, interval
        self.kept = {}

    def decode(self, layer, q, keys, values):
        n, H = len(keys), keys.shape[1]
        group, span, position = q.shape[1] // H, BLOCK * LOGICAL, int(self.positions[0])
        blocks = range(math.ceil(n / BLOCK))
        per_head = []
        for h in range(H):
            qh = q[0, h * group:(h + 1) * group].float()
            if self.streaming[layer][h]:
                read = [p for p in blocks if p * BLOCK < SINK or (p + 1) * BLOCK > n - LOCAL]
            else:
                newest = (n - 1) // span
                if (layer, h) not in self.kept or position % self.interval == 0:
                    if n - 1 <= self.budget:
                        chosen = set(range(newest + 1))
                    else:
                        def bound(p):
                            kp = keys[p * BLOCK:(p + 1) * BLOCK, h]
                            return max(float(torch.maximum(qg * kp.amax(0), qg * kp.amin(0)).sum()) for qg in qh)
                        importance = {P: max(bound(p) for p in blocks if p // LOGICAL == P) for P in range(newest)}
                        others = sorted(importance, key=lambda P: -importance[P])[:max(3, self.budget // span) - 1]
                        chosen = {*others, newest}
                    self.kept[layer, h] = chosen
                read = [p for p in blocks if p // LOGICAL in self.kept[layer, h] | {newest}]
            per_head.append(torch.cat([torch.arange(p * BLOCK, min((p + 1) * BLOCK, n)) for p in read]))
        return self.attend(q, keys, values, per_head)


def test_engine_under_continuous_batching_matches_a_plain_statement_of_lserve(tiny_gqa):
    from nanokv import SamplingParams

    steps, budget = 14, 40   # up to 107 tokens: 7 physical pages, 3 read once past 40
    llm = engine(tiny_gqa, budget)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=steps, ignore_eos=True))
    streaming = [[s < 0.5 for s in row] for row in SCORES]
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == restated_greedy(llm.model, DenseLServe(streaming, budget), prompt, steps)


def test_a_budget_and_window_covering_the_context_is_full_and_reads_fall_with_the_budget(tiny_gqa):
    from nanokv import LLM, SamplingParams

    params = SamplingParams(max_tokens=10, ignore_eos=True)
    full = LLM(str(tiny_gqa[0]), dtype="float32", block_size=BLOCK)
    expected = [o.token_ids for o in full.generate(PROMPTS, params)]
    for llm in (engine(tiny_gqa, 1000, static_sparsity=0), engine(tiny_gqa, 1000, local_size=200)):
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected
        assert llm.stats["kv_bytes_read_per_decode_token"] == full.stats["kv_bytes_read_per_decode_token"]
    read = {}
    for budget in (96, 48):
        llm = engine(tiny_gqa, budget)
        llm.generate(PROMPTS, params)
        read[budget] = llm.stats["kv_bytes_read_per_decode_token"]
    assert full.stats["kv_bytes_read_per_decode_token"] > read[96] > read[48]


def test_a_missing_artifact_names_the_duoattention_command(tiny_gqa, monkeypatch, tmp_path):
    from nanokv import LLM

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=f"python -m nanokv.calibrate duoattention --model {tiny_gqa[0]}"):
        LLM(str(tiny_gqa[0]), dtype="float32", method="lserve")


def test_a_budget_below_the_official_one_shrinks_the_streaming_windows_in_proportion():
    assert (make_method("lserve", budget=256).sink_size, make_method("lserve", budget=256).local_size) == (8, 16)
    assert make_method("lserve", budget=8).local_size == 1  # never below the option's least
    assert make_method("lserve", budget=256, sink_size=0).sink_size == 0  # given: kept
