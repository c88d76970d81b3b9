"""The batching engine on SmolLM2: batched greedy output equals single-request output, also
when the pool is so small that the scheduler must preempt and recompute; bad input is a
ValueError naming the field.

Run as a script to report divergences in another dtype:
    python tests/test_engine.py --dtype bfloat16
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import nanokv_logits  # noqa: E402
from nanokv import LLM, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow  # every test here runs SmolLM2

WORDS = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps "
         "as his father had taught him, and at the top he wound the clockwork that turned the great "
         "lens. Ships passing in the night never knew his name, but they trusted the light, and the "
         "light trusted him. One winter a storm broke the glass, and he had to decide whether to "
         "climb out onto the gallery in the wind or let the beam go dark for the first time in a "
         "hundred years. He thought about the fishing boats still out past the reef.").split()
MAX_TOKENS = 16


def prompts(n=32):
    """n prompts of mixed lengths (about 4 to 80 words), as raw text (no chat template)."""
    return [" ".join(WORDS[i % 7: i % 7 + 4 + (i * 37) % 77]) for i in range(n)]


def greedy(max_tokens=MAX_TOKENS):
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def divergences(llm, batched, single, tie=1e-4):
    """[(prompt index, step, top-2 gap of the single-request logits there)] where outputs differ."""
    found = []
    for i, (b, s) in enumerate(zip(batched, single)):
        step = next((j for j, (x, y) in enumerate(zip(b.token_ids, s.token_ids)) if x != y), None)
        if step is None:
            continue
        logits = nanokv_logits(llm.model, llm.config, s.prompt_token_ids + s.token_ids[:step], llm.dtype)[-1]
        top2 = logits.topk(2).values
        found.append((i, step, float(top2[0] - top2[1])))
    return found


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(str(smollm2_gguf), dtype="float32")


@pytest.fixture(scope="module")
def single_outputs(llm):
    return [llm.generate(p, greedy(), chat=False)[0] for p in prompts()]


def test_batched_equals_single_request(llm, single_outputs):
    batched = llm.generate(prompts(), greedy(), chat=False)
    assert llm.stats["peak_running"] == 32  # they really ran together
    assert all(len(o.token_ids) == MAX_TOKENS for o in batched)
    for i, step, gap in divergences(llm, batched, single_outputs):
        assert gap < 1e-4, f"prompt {i} diverges at step {step} where the top-2 gap is {gap:.2e}"


def test_preemption_recomputes_and_loses_nothing(llm, smollm2_gguf, single_outputs):
    # room for about three of these sequences at once: 32 requests must take turns
    per_token = 2 * 30 * 3 * 64 * 4
    small = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=3 * 96 * per_token)
    batched = small.generate(prompts(), greedy(), chat=False)
    assert small.stats["preemptions"] > 0
    assert small.stats["peak_kv_bytes"] <= small.cache.pool.total_bytes
    assert [len(o.token_ids) for o in batched] == [MAX_TOKENS] * 32
    for i, step, gap in divergences(llm, batched, single_outputs):
        assert gap < 1e-4, f"prompt {i} diverges at step {step} where the top-2 gap is {gap:.2e}"
    assert small.cache.pool.num_used == 0 and not small.cache.seqs  # everything given back


def test_request_that_can_never_fit_is_refused(smollm2_gguf):
    tiny = LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory=40 * 2 * 30 * 3 * 64 * 4)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        tiny.generate([[100, 101], list(range(100, 200))], greedy(8))
    assert not tiny.scheduler.waiting  # the request that fits was not left behind either
    [out] = tiny.generate([[100, 101]], greedy(8))
    assert len(out.token_ids) == 8


def test_abandoned_stream_gives_its_blocks_back(llm):
    pieces = iter(llm.stream("Tell me a long story about a dragon.", greedy(40), chat=False))
    next(pieces)
    assert llm.cache.pool.num_used > 0
    pieces.close()
    assert llm.cache.pool.num_used == 0 and not llm.scheduler.running and not llm.scheduler.waiting


@pytest.mark.parametrize("make, field", [
    (lambda llm: llm.generate([]), "prompts"),
    (lambda llm: llm.generate(["hi"], SamplingParams(max_tokens=0)), "max_tokens"),
    (lambda llm: llm.generate(["hi"], SamplingParams(max_tokens=-2)), "max_tokens"),
    (lambda llm: llm.generate(["hi"], SamplingParams(temperature=-1)), "temperature"),
    (lambda llm: llm.generate(["hi"], SamplingParams(top_p=0)), "top_p"),
    (lambda llm: llm.generate(["hi"], SamplingParams(top_p=1.01)), "top_p"),
    (lambda llm: llm.generate([[5] * 8192]), "prompt"),
    (lambda llm: llm.generate(["a", "b"], [SamplingParams()]), "SamplingParams"),
])
def test_bad_input_names_the_field(llm, make, field):
    with pytest.raises(ValueError, match=field):
        make(llm)


def test_one_run_at_a_time(llm):
    first = iter(llm.stream("Once upon a time", greedy(20), chat=False))
    next(first)
    with pytest.raises(ValueError, match="still running"):
        llm.generate(["The weather"], greedy(2), chat=False)
    first.close()
    assert len(llm.generate(["The weather"], greedy(2), chat=False)[0].token_ids) == 2


def test_sampling_is_seeded_per_request(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a = llm.generate(["Once upon a time", "The weather"], params, chat=False)
    b = llm.generate(["The weather", "Once upon a time"], params, chat=False)
    assert a[0].token_ids == b[1].token_ids and a[1].token_ids == b[0].token_ids


if __name__ == "__main__":
    import argparse

    from nanokv.hub import resolve_model

    parser = argparse.ArgumentParser(description="Batched vs single-request greedy output on SmolLM2.")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    engine = LLM(str(resolve_model("smollm2-135m").path), dtype=args.dtype)
    single = [engine.generate(p, greedy(), chat=False)[0] for p in prompts()]
    batched = engine.generate(prompts(), greedy(), chat=False)
    found = divergences(engine, batched, single)
    print(f"{args.dtype}: {len(found)} of 32 prompts diverge (greedy, {MAX_TOKENS} tokens)")
    for i, step, gap in found:
        print(f"  prompt {i:2d} ({len(single[i].prompt_token_ids)} tokens): first differs at step {step}, "
              f"single-request top-2 gap there {gap:.3g}")
