"""KVSharer: the layer map the calibration's pairs make, its ranking and greedy search on
hand-built inputs, and the engine against a dense restatement (shared layers attend over their
source layer's keys and values and hold no blocks)."""

import json
import math
from functools import partial

import pytest
import torch

from nanokv.calibrate.dense import run_dense
from nanokv.calibrate.kvsharer import greedy_pairs, ranked_pairs
from nanokv.methods import make_method
from nanokv.methods.kvsharer import layer_sources
from tests.helpers import assert_preemption_repeats


def test_pairs_make_a_layer_map_whose_chains_end_at_a_layer_that_keeps_its_own():
    assert layer_sources([[5, 3]], 6) == [0, 1, 2, 3, 4, 3]
    assert layer_sources([[5, 3], [3, 1]], 6) == [0, 1, 2, 1, 4, 1]   # 5 read 3, which now reads 1
    assert layer_sources([[3, 1], [5, 3]], 6) == [0, 1, 2, 1, 4, 1]


def test_pairs_are_ranked_most_dissimilar_first():
    # layer l's mean keys are l * ones and its values 2 l * ones, D = 4: the distance of (i, j) is
    # (|i - j| * 2 + |i - j| * 4) / 2 = 3 |i - j|
    L, H, T, D = 4, 2, 3, 4
    keys = torch.stack([torch.full((H, T, D), float(l)) for l in range(L)])
    ranked = ranked_pairs(keys, 2 * keys)
    assert ranked[0] == (3, 0)
    gaps = [i - j for i, j in ranked]
    assert gaps == sorted(gaps, reverse=True) and set(ranked) == {(i, j) for i in range(L) for j in range(i)}


def test_the_greedy_search_keeps_pairs_above_the_threshold_and_a_layer_shares_once():
    ranked = [(5, 0), (4, 1), (5, 2), (3, 0), (2, 1), (1, 0)]
    tried = []

    def similarity(pairs):  # any map in which layer 4 reads another layer breaks the output
        tried.append(pairs[-1])
        return 0.2 if layer_sources(pairs, 6)[4] != 4 else 0.9

    assert greedy_pairs(ranked, similarity, 3, 0.5) == [[5, 0], [3, 0], [2, 1]]
    assert (5, 2) not in [tuple(p) for p in tried]         # 5 shares already: not even tried
    assert greedy_pairs(ranked, similarity, 2, 0.5) == [[5, 0], [3, 0]]  # the first k of a longer search


def test_kvsharer_options():
    with pytest.raises(ValueError, match="shares whole layers"):
        make_method("kvsharer", budget=64)
    method = make_method("kvsharer", compression=0.25)
    with pytest.raises(ValueError, match="--share-layers 8"):
        method.bind_calibration({"num_layers": 30, "model": "m", "pairs": [[5, 0]]})
    method.bind_calibration({"num_layers": 8, "model": "m", "pairs": [[7, 1], [6, 2], [5, 0]]})
    assert method.sources == [0, 1, 2, 3, 4, 5, 2, 1]      # round(0.25 x 8) = 2 pairs
    assert [method.kept_after_prefill(100, layer, 8) for layer in (5, 6, 7)] == [100, 0, 0]


def write_artifact(path, pairs, num_layers=30, num_kv_heads=3):
    path.write_text(json.dumps({"format": 1, "method": "kvsharer", "model": "smollm2-135m", "num_layers": num_layers,
                                "num_kv_heads": num_kv_heads, "pairs": pairs, "similarities": [1.0] * len(pairs),
                                "settings": {}}))
    return str(path)


PAIRS = [[29, 3], [20, 10], [12, 11], [25, 20], [7, 6], [16, 2]]  # 25 -> 20 -> 10: a chain


@torch.inference_mode()
@pytest.mark.slow
def test_shared_layers_read_their_source_and_hold_no_blocks(smollm2_gguf, tmp_path):
    from nanokv import LLM, SamplingParams

    artifact = write_artifact(tmp_path / "kvsharer.json", PAIRS)
    llm = LLM(str(smollm2_gguf), dtype="float32", method="kvsharer", compression=0.2, calibration_file=artifact,
              max_num_seqs=2)
    sources = llm.cache.sources
    assert sources == layer_sources(PAIRS, 30) and sources[25] == 10
    prompts = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((60, 25, 90))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    for prompt, out in zip(prompts, outs):  # greedy over the whole sequence, recomputed densely each step
        tokens = []
        for _ in range(6):
            hidden, _ = run_dense(llm.model, prompt + tokens, sources=sources)
            tokens.append(int(llm.model.compute_logits(hidden[-1:])[0].argmax()))
        assert out.token_ids == tokens
        held = len(prompt) + 5
        owned = sum(s == layer for layer, s in enumerate(sources))
        per_block = llm.cache.pool.bytes_per_block
        assert out.metrics["kv_cache_bytes"] == owned * 3 * math.ceil(held / 16) * per_block
        assert out.metrics["kv_cache_bytes_uncompressed"] == 30 * 3 * math.ceil(held / 16) * per_block
    assert owned == 24  # round(0.2 x 30) = 6 layers share


@pytest.mark.slow
def test_preemption_recomputes_the_same_tokens(smollm2_gguf, tmp_path):
    from nanokv import LLM, SamplingParams

    artifact = write_artifact(tmp_path / "kvsharer.json", PAIRS)
    prompts = [[200 + (i * 31 + j * 17) % 4000 for j in range(40)] for i in range(6)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    assert_preemption_repeats(partial(LLM, str(smollm2_gguf), dtype="float32", method="kvsharer", compression=0.2,
                                      calibration_file=artifact), prompts, params, 800)


@pytest.mark.slow
def test_the_calibration_command_writes_pairs_the_engine_reads(smollm2_gguf, tmp_path):
    from nanokv import LLM
    from nanokv.calibrate import load_calibration
    from nanokv.calibrate.cli import main

    out = tmp_path / "kvsharer.json"
    assert main(["kvsharer", "--model", "smollm2-135m", "--samples", "2", "--length", "32", "--share-layers", "3",
                 "--out", str(out)]) == 0
    artifact = load_calibration("kvsharer", "smollm2-135m", 30, 3, out)
    assert len(artifact["pairs"]) == 3 and all(s > 0.5 for s in artifact["similarities"])
    assert len({later for later, _ in artifact["pairs"]}) == 3
    llm = LLM(str(smollm2_gguf), dtype="float32", method="kvsharer", compression=0.1, calibration_file=str(out))
    assert sum(s != layer for layer, s in enumerate(llm.cache.sources)) == 3
    with pytest.raises(ValueError, match="30 layers x 3 kv-heads.*28 x 3"):
        load_calibration("kvsharer", "smollm2-135m", 28, 3, out)
