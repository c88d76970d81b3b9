"""The quality harness: task generators (lengths, needles, determinism), scoring, the grid's
resume, tables and plots, and argument checking before any model is loaded."""

import json
import re
from collections import Counter

import pytest

from nanokv.eval import grid
from nanokv.eval.__main__ import main
from nanokv.eval.tasks import DEPTHS, TASKS, make_sample, score


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    from nanokv import LLM

    return LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=64 << 20)


def tokens(llm, sample):
    return len(grid.encode(llm, sample)[0])


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("target", [1024, 2048])
@pytest.mark.slow
def test_samples_land_on_the_target_length_hold_their_answers_and_repeat(llm, task, target):
    sample = make_sample(task, target, lambda s: tokens(llm, s), seed=3, index=1)
    assert abs(tokens(llm, sample) - target) <= 0.02 * target
    assert sample.answers and all(a in sample.context for a in sample.answers)
    assert not any(a in sample.question for a in sample.answers)
    again = make_sample(task, target, lambda s: tokens(llm, s), seed=3, index=1)
    other = make_sample(task, target, lambda s: tokens(llm, s), seed=4, index=1)
    assert again == sample and other.answers != sample.answers


@pytest.mark.slow
def test_a_single_needle_sits_at_its_depth(llm):
    for index, depth in enumerate(DEPTHS):
        sample = make_sample("niah_number", 2048, lambda s: tokens(llm, s), index=index)
        body = sample.context.split("\n", 1)[1]  # the filler, after the instruction line
        at = body.index(f"is: {sample.answers[0]}.")
        assert sample.depth == depth and abs(at / len(body) - depth) < 0.02, (depth, at / len(body))


@pytest.mark.slow
def test_the_answers_are_what_the_text_says(llm):
    """Recount from the generated text, independently of the generator."""
    count = lambda s: tokens(llm, s)
    fwe = make_sample("fwe", 1024, count)
    words = Counter(fwe.context.split(". ", 2)[-1].split())
    assert [w for w, _ in words.most_common(3)] == fwe.answers
    cwe = make_sample("cwe", 1024, count)
    listed = Counter(re.findall(r"\d+\. (\w+)", cwe.context))
    assert sorted(w for w, n in listed.items() if n == 6) == sorted(cwe.answers)
    assert set(n for w, n in listed.items() if w not in cwe.answers) == {2}
    vt = make_sample("vt", 1024, count)
    value = re.search(r"VAR \w+ = (\d+)\.", vt.context).group(1)
    holders, changed = {re.search(rf"VAR (\w+) = {value}\.", vt.context).group(1)}, True
    while changed:  # follow the chain of assignments
        found = {m for m in re.findall(r"VAR (\w+) = VAR (\w+)\.", vt.context) if m[1] in holders}
        changed = bool({a for a, _ in found} - holders)
        holders |= {a for a, _ in found}
    assert holders == set(vt.answers)
    multikey = make_sample("niah_multikey", 1024, count)
    assert multikey.context.count("One of the special magic numbers for") == 4


def test_scoring_gives_partial_credit():
    assert score("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert score("The numbers are 123 and 456.", ["123", "456", "789"], "part") == 1.0
    assert score("nothing here", ["123"], "all") == 0.0 and score("nothing", ["123"], "part") == 0.0
    assert score("It is Dark-Saddle.", ["dark-saddle"]) == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_number,foo"], "unknown task 'foo'; valid: niah_number"),
    (["--methods", ""], "--methods is empty"),
    (["--methods", "full,magic"], "unknown method 'magic'"),
    (["--lengths", "100000"], r"length 100000 is outside \[128, 8192\)"),
    (["--compression", "1.5"], r"compression must be in \[0, 1\)"),
    (["--placements", "before"], "unknown placement 'before'; valid: after, inside"),
    (["--methods", "snapkv", "--compression", ""], "give --compression or --budget"),
    (["--methods", "quest"], "give --budget for quest"),
    (["--methods", "kivi:bits=3"], "bits=3 of method 'kivi' must be 2, 4 or 8"),
    (["--methods", "kivi:bits"], "method 'kivi:bits': option .*'bits' is not KEY=VALUE"),
])
def test_bad_arguments_fail_before_a_model_is_loaded(monkeypatch, capsys, argv, message):
    import nanokv.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(nanokv.loading, "load_model", no_loading)
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_grid_runs_quantization_once_and_quest_at_budgets_only():
    assert grid.settings(["full", "kivi:bits=4", "quest", "snapkv+kivi"], [0.5], [256]) == [
        grid.Setting("full"), grid.Setting("kivi:bits=4"), grid.Setting("quest", budget=256),
        grid.Setting("snapkv+kivi", compression=0.5), grid.Setting("snapkv+kivi", budget=256)]


@pytest.mark.slow
def test_a_grid_resumes_and_writes_tables_and_plots(smollm2_gguf, tmp_path):
    from nanokv import LLM

    made = []

    def factory(setting):
        made.append(setting.label)
        return LLM(str(smollm2_gguf), dtype="float32", method=setting.method, compression=setting.compression,
                   budget=setting.budget, kv_cache_memory=64 << 20, window_size=8) if setting.method == "snapkv" else \
            LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=64 << 20)

    settings = grid.settings(["full", "snapkv"], [0.5], [])
    args = (settings, [256], ["niah_number"], ["after", "inside"], 2, 0, tmp_path)
    grid.run(factory, *args, log=lambda *_: None)
    assert made == ["full", "snapkv@0.5"]
    grid.run(factory, *args, log=lambda *_: None)  # everything is there: nothing runs again
    assert made == ["full", "snapkv@0.5"]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2
    by = {(r["setting"], r["placement"]): r for r in rows if r["index"] == 0}
    full_bytes, snap_bytes = by["full", "after"]["kv_bytes_per_token"], by["snapkv@0.5", "after"]["kv_bytes_per_token"]
    assert snap_bytes < 0.75 * full_bytes  # half the context evicted: real bytes
    cells = grid.summarize(tmp_path)
    assert {c["setting"] for c in cells} == {"full", "snapkv@0.5"} and all(c["samples"] == 2 for c in cells)
    table = (tmp_path / "table.md").read_text()
    assert "| niah_number |" in table and "snapkv@0.5" in table
    for path in grid.plot(cells, tmp_path):
        assert path.stat().st_size > 5000


@pytest.mark.slow
def test_perplexity_read_through_the_cache_is_the_prefill_perplexity(smollm2_gguf):
    """Teacher-forced one token at a time through the cache, `full` predicts each token exactly as
    one prefill over the whole text does; quantizing the cache to 2 bits moves it."""
    import math

    import torch

    from nanokv import LLM
    from nanokv.eval.perplexity import default_text, perplexity

    llm = LLM(str(smollm2_gguf), dtype="float32")
    ids = llm.tokenizer.encode(default_text())[:80]
    with torch.inference_mode():
        from nanokv.engine.attention import StepAttention

        llm.cache.add(0)
        attention = StepAttention(llm.cache, [0], [len(ids)], torch.arange(len(ids)))
        logits = llm.model.compute_logits(llm.model(torch.tensor(ids), torch.arange(len(ids)), attention))
        llm.cache.free(0)
    nll = torch.nn.functional.cross_entropy(logits[20:-1].float(), torch.tensor(ids[21:]))
    ppl, held, unrounded = perplexity(llm, ids, prefill=21)
    assert math.isclose(ppl, math.exp(float(nll)), rel_tol=1e-4)
    assert held == llm.cache.uncompressed_bytes(len(ids)) / len(ids)
    assert unrounded == 30 * 3 * (2 * 64 * 4 + 4)  # SmolLM2: 30 layers x 3 kv-heads, float32 K, V and a position
    quantized = LLM(str(smollm2_gguf), dtype="float32", method="kivi:bits=2:residual_length=32")
    ppl2, held2, unrounded2 = perplexity(quantized, ids, prefill=21)
    assert ppl2 != ppl and held2 < held / 2 and unrounded2 < unrounded / 2
