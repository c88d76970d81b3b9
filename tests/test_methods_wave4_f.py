"""Retrieval Head and RazorAttention (issue 27): their calibrations (the copy score as the official
detector counts it, the echo / induction scores of repeated random tokens, each on a stand-in model
that looks where we tell it), the head split they imply on hand-made profiles, the methods in the
engine under continuous batching and preemption, and the command end to end on a tiny random model."""

import json
import math
import re
import types

import pytest
import torch

from nanokv.calibrate import (cli, copy_hits, echo_induction_hits, fold_query_heads, load_calibration, model_key,
                              needle_probe, razor_scores, repeated_random_tokens, retrieval_head_scores)
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from nanokv.methods.razorattention import share
from test_calibrate import byte_tokenizer, byte_tokenizer_json, tiny_dir  # noqa: F401 (fixtures)


class Pointing:
    """A stand-in model: one layer, H kv-heads of `group` query heads each; the query at slot r of
    query head j looks (all but exactly) at slot points[j](r): one-hot keys, one-hot queries."""

    def __init__(self, points, num_kv_heads):
        self.points, self.H = points, num_kv_heads
        self.inv_freq = torch.ones(2)

    def __call__(self, input_ids, positions, attention):
        S = len(input_ids)
        k = torch.eye(S)[:, None, :].repeat(1, self.H, 1) * 1000.0          # [S, H, D=S]
        q = torch.zeros(S, len(self.points), S)
        for j, point in enumerate(self.points):
            for r in range(S):
                q[r, j, point(r)] = 1.0
        attention(0, q, k, torch.zeros_like(k), None)
        return torch.zeros(S, 1)


CFG = types.SimpleNamespace(num_layers=1, num_kv_heads=2)


# --- retrieval_head: the copy score ---------------------------------------------------------------

def test_retrieval_head_scores_count_copies_over_the_span_and_take_the_groups_max():
    # slots 0..9 filler, the needle 10..15 whose value 40 41 42 sits at 12..14 (the span), the
    # prompt ends at 20, then 40 41 42 fed as the reply: the queries at 19, 20, 21 predict them
    ids = list(range(100, 110)) + [30, 31, 40, 41, 42, 32] + [50, 51, 52, 53] + [40, 41, 42]
    n, span = 20, (12, 15)
    at = lambda slot_of: (lambda r: slot_of(r - (n - 1)) if r >= n - 1 else 0)  # noqa: E731  by answer index j
    points = [at(lambda j: 12 + j),                    # kv 0: copies all three -> 3/3
              at(lambda j: 13 + j),                    # kv 0: one token late, never equal -> 0
              at(lambda j: 12 if j == 0 else 0),       # kv 1: only the first -> 1/3
              at(lambda j: 12 + j if j < 2 else 15)]   # kv 1: two, then slot 15 (outside, and 32) -> 2/3
    scores = retrieval_head_scores(Pointing(points, 2), CFG, [(ids, span, n)])
    # the max over each kv-head's query heads (their mean would be 0.5 and 0.5)
    assert scores.tolist() == [[pytest.approx(1.0), pytest.approx(2 / 3)]]
    # a copy outside the span does not count, even of the same token: the needle's 41 at 13 with the
    # span cut to 12..12
    assert retrieval_head_scores(Pointing(points, 2), CFG, [(ids, (12, 13), n)]).tolist() == \
        [[pytest.approx(1 / 3), pytest.approx(1 / 3)]]


def restated_retrieval_scores(attention, token_ids, targets, start, end, group):
    """nightdessert/Retrieval_Head retrieval_head_detection.py, retrieval_calculate (topk=1), one
    query head and one decode step at a time: score += 1 / (needle_end - needle_start) when the top
    slot is inside the needle and holds the token generated. Then the max over each kv-head's group."""
    per_query_head = []
    for head in attention:
        score = 0.0
        for step, target in zip(head, targets.tolist()):
            i = int(step.argmax())
            if start <= i < end and int(token_ids[i]) == target:
                score += 1 / (end - start)
        per_query_head.append(score)
    return [max(per_query_head[h:h + group]) for h in range(0, len(per_query_head), group)]


def test_copy_hits_folded_by_max_restate_the_official_rule():
    torch.manual_seed(0)
    token_ids = torch.randint(0, 5, (40,))
    start, end = 10, 16
    targets = token_ids[start:end].clone()                    # the answer is the span's own tokens
    attention = torch.randn(6, end - start, 40)
    attention[:2, :, start:end] += 2.5 * torch.eye(end - start)[None]   # kv-head 0's heads copy, mostly
    hits = copy_hits(attention, token_ids, targets, (start, end))
    ours = fold_query_heads(hits[None].double(), 3, "max")[0]
    assert ours.tolist() == pytest.approx(restated_retrieval_scores(attention, token_ids, targets, start, end, 2))
    assert float(ours[0]) > 0.5


def test_the_value_span_holds_the_answer_inside_the_needle(byte_tokenizer):
    for index in range(3):
        ids, (start, end), n = needle_probe(byte_tokenizer, 600, seed=0, index=index, span="value")
        _, (needle_start, needle_end), _ = needle_probe(byte_tokenizer, 600, seed=0, index=index)
        assert ids[start:end] == ids[n:] and needle_start < start < end < needle_end


# --- razorattention: echo and induction scores ------------------------------------------------------

def test_echo_induction_hits_read_the_previous_occurrence_and_the_token_after_it():
    # R = 3, queries at slots 5 and 6: previous occurrences at 2 and 3, the tokens after them at 3 and 4
    probs = torch.zeros(2, 2, 7)
    probs[0, 0, 2], probs[0, 0, 0] = 0.6, 0.4     # head 0, query 5: 0.6 echo, nothing on slot 3
    probs[0, 1, 3], probs[0, 1, 4] = 0.5, 0.5     # head 0, query 6: 0.5 echo (3), 0.5 induction (4)
    probs[1, 0, 3] = 1.0                          # head 1, query 5: all on 3, the induction slot
    probs[1, 1, 4] = 1.0                          # head 1, query 6: all on 4, induction
    echo, induction = echo_induction_hits(probs, torch.tensor([5, 6]), 3)
    assert echo.tolist() == pytest.approx([(0.6 + 0.5) / 2, 0.0])
    assert induction.tolist() == pytest.approx([(0.0 + 0.5) / 2, 1.0])


def test_razor_scores_find_the_echo_and_the_induction_head():
    R, start = 5, 1
    ids = [0] + [10, 11, 12, 13, 14] * 4                       # BOS, then 4 copies: queries at 6..20
    points = [lambda r: max(r - R, 0),                         # kv 0: echo
              lambda r: 0,                                     # kv 0: a sink head
              lambda r: max(r - R + 1, 0),                     # kv 1: induction
              lambda r: max(r - 1, 0)]                         # kv 1: the previous token
    echo, induction = razor_scores(Pointing(points, 2), CFG, [(ids, start, R), (ids, start, R)])
    assert echo.tolist() == [[pytest.approx(1.0, abs=1e-6), pytest.approx(0.0, abs=1e-6)]]
    assert induction.tolist() == [[pytest.approx(0.0, abs=1e-6), pytest.approx(1.0, abs=1e-6)]]


def test_repeated_random_tokens_repeat_a_segment_of_distinct_ordinary_ids(byte_tokenizer):
    ids, start, R = repeated_random_tokens(byte_tokenizer, 256, 200, seed=0, index=1)
    assert start == len(byte_tokenizer.encode("")) and R == (200 - start) // 4
    segment = ids[start:start + R]
    assert ids[start:] == segment * 4 and len(set(segment)) == R
    assert repeated_random_tokens(byte_tokenizer, 256, 200, seed=0, index=2)[0] != ids   # varied per sample
    with pytest.raises(ValueError, match="at most the 256 ordinary token ids"):
        repeated_random_tokens(byte_tokenizer, 256, 4 * 300, seed=0, index=0)


# --- the head split on hand-made profiles -----------------------------------------------------------

def kept(mask, S, H=2):
    if mask is None:
        return [list(range(S))] * H
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in mask]


def prompt_view(layer, S, H=2, num_layers=2):
    return PrefillView(layer, num_layers, torch.zeros(S, 2 * H, 4), torch.zeros(H, S, 4), torch.arange(S))


def bound(name, artifact, **options):
    method = make_method(name, **options)
    method.bind_calibration(artifact)
    return method


def test_retrieval_heads_keep_everything_and_the_others_sinks_and_recent():
    # threshold 0.1, strictly above: (0, 0) 0.5 and (1, 1) 0.2 are retrieval heads, (1, 0) at 0.1 is not
    profile = {"head_scores": [[0.5, 0.05], [0.1, 0.2]]}
    method = bound("retrieval_head", profile, budget=6, sink_size=2)
    # S = 10, B = 6: a non-retrieval head keeps sinks 0, 1 and the newest 4: 6..9
    assert kept(method.keep_mask(prompt_view(0, 10)), 10) == [list(range(10)), [0, 1, 6, 7, 8, 9]]
    assert kept(method.keep_mask(prompt_view(1, 10)), 10) == [[0, 1, 6, 7, 8, 9], list(range(10))]
    assert method.kept_after_prefill(10, 0, 2) == math.ceil((10 + 6) / 2)
    assert method.keep_mask(prompt_view(0, 6)) is None                      # within the budget
    # a higher threshold: nobody retrieves, every head keeps the budget
    strict = bound("retrieval_head", profile, budget=6, sink_size=2, threshold=0.5)
    assert kept(strict.keep_mask(prompt_view(0, 10)), 10) == [[0, 1, 6, 7, 8, 9]] * 2
    # compression 0.7 keeps ceil(0.3 x 10) = 3: sinks 0, 1 and slot 9
    assert kept(bound("retrieval_head", profile, compression=0.7, sink_size=2).keep_mask(prompt_view(0, 10)),
                10)[1] == [0, 1, 9]


def test_others_snapkv_keeps_snapkvs_choice_in_the_non_retrieval_heads():
    profile = {"head_scores": [[0.5, 0.05], [0.0, 0.0]]}
    method = bound("retrieval_head", profile, budget=5, others="snapkv", window_size=2)
    token_scores = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [0, 5, 1, 7, 2, 6, 3, 4, math.inf, math.inf]])
    method.scores = lambda view: token_scores
    # head 0 retrieves: all; head 1: its window (8, 9) and its top 3 prefix scores: slots 3 (7), 5 (6), 1 (5)
    assert kept(method.keep_mask(prompt_view(0, 10)), 10) == [list(range(10)), [1, 3, 5, 8, 9]]


@pytest.mark.parametrize("S, budget, sink", [(30, 7, 4), (12, 5, 0), (40, 11, 3), (9, 8, 4)])
def test_retrieval_head_restated_as_a_plain_loop(S, budget, sink):
    g = torch.Generator().manual_seed(S)
    profile = torch.rand(2, 2, generator=g, dtype=torch.float64) * 0.2   # some above 0.1, some not
    method = bound("retrieval_head", {"head_scores": profile.tolist()}, budget=budget, sink_size=sink)
    for layer in range(2):
        want = []
        for h in range(2):
            if profile[layer, h] > 0.1 or S <= budget:
                want.append(list(range(S)))
            else:
                want.append(sorted(set(range(min(sink, S))) | set(range(S - (budget - sink), S))))
        assert kept(method.keep_mask(prompt_view(layer, S)), S) == want


def test_razor_protects_the_top_echo_and_induction_heads_and_buffers_max_s0_n_over_c():
    # 2 layers x 4 kv-heads: echo 1% -> ceil(0.08) = 1 head, induction 14% -> ceil(1.12) = 2 heads
    induction = [[0.9, 0.1, 0.0, 0.3], [0.2, 0.8, 0.05, 0.0]]    # top 2: (0, 0), (1, 1)
    echo = [[0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.7]]          # top 1: (1, 3)
    method = bound("razorattention", {"head_scores": induction, "echo_scores": echo}, compression=0.75,
                   compensation=False)
    assert method.retrieval_heads().tolist() == [[True, False, False, False], [False, True, False, True]]
    # N = 40, C = 4: L_h = max(0, 10) = 10 recent + N0 = 4 sinks
    mask = method.keep_mask(prompt_view(1, 40, H=4))
    assert kept(mask, 40, H=4) == [list(range(4)) + list(range(30, 40)), list(range(40)),
                                   list(range(4)) + list(range(30, 40)), list(range(40))]
    assert method.kept_after_prefill(40, 1, 2) == math.ceil((2 * 40 + 2 * 14) / 4)
    # S0 = 16 floors the buffer: 4 + 16; a prompt of 20 or fewer is kept whole
    floored = bound("razorattention", {"head_scores": induction, "echo_scores": echo}, compression=0.75, s0=16,
                    compensation=False)
    assert kept(floored.keep_mask(prompt_view(0, 40, H=4)), 40, H=4)[1] == list(range(4)) + list(range(24, 40))
    assert floored.keep_mask(prompt_view(0, 20, H=4)) is None
    # budget=B is N / C directly: 4 sinks + 6
    by_budget = bound("razorattention", {"head_scores": induction, "echo_scores": echo}, budget=6,
                       compensation=False)
    assert kept(by_budget.keep_mask(prompt_view(0, 40, H=4)), 40, H=4)[2] == list(range(4)) + list(range(34, 40))


def test_shares_round_up_without_float_noise():
    assert share(0.14, 100) == 14 and share(0.01, 90) == 1 and share(0.0, 90) == 0 and share(1.0, 7) == 7
    assert share(0.14, 8) == 2


# --- bad settings and missing calibrations ----------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, message", [
    ("retrieval_head", {"threshold": 1.5}, r"threshold=1.5 .* must be a number in \[0, 1\)"),
    ("retrieval_head", {"others": "h2o"}, r"others='h2o' .* must be 'streaming' \(sinks \+ recent\) or 'snapkv'"),
    ("retrieval_head", {"sink_size": -1}, r"sink_size=-1 .* must be an integer >= 0"),
    ("retrieval_head", {"budget": 4}, r"budget=4 must exceed sink_size=4"),
    ("retrieval_head", {"budget": 32, "others": "snapkv"}, r"budget=32 must exceed window_size=32"),
    ("razorattention", {"echo_ratio": 2.0}, r"echo_ratio=2.0 .* must be a number in \[0, 1\]"),
    ("razorattention", {"induction_ratio": -0.1}, r"induction_ratio=-0.1 .* must be a number in \[0, 1\]"),
    ("razorattention", {"s0": -3}, r"s0=-3 .* must be an integer >= 0"),
    ("razorattention", {"threshold": 0.2}, r"unknown option 'threshold' for method 'razorattention'"),
])
def test_bad_options_name_the_value_and_the_valid_range(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_method(name, **{"compression": 0.5, **kwargs} if "budget" not in kwargs else kwargs)


def test_a_method_without_its_calibration_names_the_command():
    for name in ("retrieval_head", "razorattention"):
        with pytest.raises(ValueError, match=f"no calibration.*python -m nanokv.calibrate {name}"):
            make_method(name, budget=8).keep_mask(prompt_view(0, 20))
    with pytest.raises(ValueError, match="no echo_scores .*python -m nanokv.calibrate razorattention"):
        make_method("razorattention", budget=8).bind_calibration({"head_scores": [[0.1, 0.2]]})


# --- in the engine ------------------------------------------------------------------------------------

TINY_PROMPTS = [[(i * 37 + j * 11) % 256 for j in range(n)] for i, n in enumerate((6, 3, 20, 2, 15, 9, 4, 7))]
RETRIEVAL = [[True, False], [False, True]]                  # (layer 0, head 0) and (layer 1, head 1)


def engine_method(kind):
    if kind == "retrieval_head":   # 0.3, 0.2 above 0.1
        return bound("retrieval_head", {"head_scores": [[0.3, 0.0], [0.05, 0.2]]}, budget=5, sink_size=2)
    # 4 kv-heads: induction 25% protects (0, 0), echo 25% protects (1, 1); others keep 2 + max(0, 3)
    return bound("razorattention", {"head_scores": [[0.9, 0.1], [0.2, 0.3]], "echo_scores": [[0.0, 0.1], [0.2, 0.8]]},
                 budget=3, sink_size=2, induction_ratio=0.25, echo_ratio=0.25, compensation=False)  # see test_razor_compensation


@pytest.mark.parametrize("kind", ["retrieval_head", "razorattention"])
def test_mixed_prompts_keep_the_split_in_real_blocks_through_preemption(tiny, kind):
    """Continuous batching of prompts shorter and longer than the budget: each retrieval head ends
    holding its whole prompt, each other head its 5 kept prompt tokens, both plus the generated ones,
    in the blocks that takes; the pool gets every block back; with too few blocks sequences are
    preempted and recomputed and every output is as with room to spare."""
    from test_methods_decode_wave2 import serve

    steps = 12
    method = engine_method(kind)
    assert method.retrieval_heads().tolist() == RETRIEVAL
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, steps)
    assert preemptions == 0
    # 36 blocks: the 20-token prompt and its 12 tokens alone need 4 heads x 8 (the scheduler's check
    # ignores the compression), so sequences are preempted and recomputed
    tight, held_tight, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 36, steps)
    assert tight_preemptions > 0
    assert tight == roomy
    for prompt, (lengths, blocks), (lengths_tight, _) in zip(TINY_PROMPTS, held, held_tight):
        n, generated = len(prompt), steps - 1                  # the last token is sampled, never cached
        want = torch.tensor([[n if full else min(n, 5) for full in row] for row in RETRIEVAL]) + generated
        assert lengths.tolist() == want.tolist() and lengths_tight.tolist() == want.tolist()
        assert blocks.tolist() == ((want + 3) // 4).tolist()
    assert cache.pool.num_free == cache.pool.usable_blocks


# --- the command end to end on a tiny random model -----------------------------------------------------

@pytest.mark.parametrize("calibration, length, options", [
    ("retrieval_head", 512, {"sink_size": 2}),
    ("razorattention", 256, {"sink_size": 2, "induction_ratio": 0.25, "echo_ratio": 0.25})])
def test_calibrate_writes_an_artifact_that_round_trips_into_llm(tiny_dir, monkeypatch, tmp_path, capsys,
                                                                calibration, length, options):
    from nanokv import LLM, SamplingParams

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"run `python -m nanokv.calibrate {calibration} --model {tiny_dir}`")):
        LLM(str(tiny_dir), dtype="float32", method=calibration, compression=0.5, **options)
    argv = [calibration, "--model", str(tiny_dir), "--samples", "2", "--length", str(length), "--device", "cpu"]
    assert cli.main(argv) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / f"{calibration}.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    artifact = load_calibration(calibration, str(tiny_dir), 2, 2)            # checked against the shape
    assert artifact == json.loads(path.read_text())
    assert (artifact["method"], artifact["settings"]["samples"], artifact["settings"]["length"]) == \
        (calibration, 2, length)
    fields = ["head_scores"] + (["echo_scores"] if calibration == "razorattention" else [])
    for field in fields:
        scores = torch.tensor(artifact[field])
        assert scores.shape == (2, 2) and bool(((scores >= 0) & (scores <= 1)).all())
    llm = LLM(str(tiny_dir), dtype="float32", method=calibration, compression=0.5, **options)
    assert llm.method.head_scores.tolist() == artifact["head_scores"]
    if calibration == "razorattention":   # 25% of 4 kv-heads each: one or two protected heads
        assert llm.method.echo_scores.tolist() == artifact["echo_scores"]
        assert 1 <= int(llm.method.retrieval_heads().sum()) <= 2
    outs = llm.generate([[i % 200 + 30 for i in range(n)] for n in (150, 90)],
                        SamplingParams(max_tokens=2, ignore_eos=True))
    assert all(len(o.token_ids) == 2 for o in outs)
    # another method's artifact is refused by name
    with pytest.raises(ValueError, match=f"made for method '{calibration}', not 'duoattention'"):
        load_calibration("duoattention", str(tiny_dir), 2, 2, path=path)


@pytest.mark.slow
def test_profiles_of_a_real_model_single_out_few_heads(smollm2_gguf, tmp_path):
    """On SmolLM2 (30 layers x 3 kv-heads) few kv-heads copy the needle (the paper: under 5% of query
    heads score above 0.1; a kv-head takes its 3 query heads' max), and a few heads clearly induce
    while the median head puts almost nothing on the token to predict."""
    from nanokv.calibrate.cli import calibrate

    copy = json.loads(calibrate("retrieval_head", str(smollm2_gguf), samples=2, length=512,
                                out=tmp_path / "rh.json", device="cpu", quiet=True).read_text())
    scores = torch.tensor(copy["head_scores"])
    assert scores.shape == (30, 3) and 0 < int((scores > 0.1).sum()) < 20 and float(scores.max()) > 0.5
    razor = json.loads(calibrate("razorattention", str(smollm2_gguf), samples=2, length=512,
                                 out=tmp_path / "razor.json", device="cpu", quiet=True).read_text())
    induction = torch.tensor(razor["head_scores"])
    assert float(induction.max()) > 0.3 and float(induction.median()) < 0.05
