"""Decode steps as CUDA graphs (nanokv/engine/cuda_graphs.py).

Without a GPU the graphs' static buffers still run, eagerly (`capture=False`): a batch padded to
its bucket, tables copied into a wider buffer, padding rows that write to a scratch block. So the
CPU checks that this path gives the eager path's greedy tokens, with the C++ kernels and with the
Triton ones under the interpreter; on CUDA (marked `gpu`), the captured graphs do.
"""

import pytest
import torch

from nanokv import LLM, SamplingParams
from nanokv.engine.cuda_graphs import DecodeGraphs, batch_buckets, eager_reason, most_table_bytes
from nanokv.cache.build import build_cache
from nanokv.cache.latent_cache import LatentKVCache
from nanokv.methods import METHODS, make_method
from nanokv.methods.registry import QUANTIZERS
from test_kernels_engine import PROMPTS, count_readbacks, greedy

GRAPH_METHODS = {None: None, "snapkv": dict(budget=12, window_size=4), "quest": dict(budget=8, skip_layers=0),
                 "minicache": {}, "h2o": dict(budget=12), "cam": dict(budget=12)}
# the evictors whose rounds the host counts: their decode is captured, one graph per rounds pattern
CAPTURED_EVICTORS = [name for name, m in METHODS.items() if m.evicts_during_decode
                     and not make_method(name, compression=0.5).budgets_from_state]


def sample_method(name):
    """`name` with settings the tiny model runs: full, the quantizers and the blending methods as
    they come (groups of 8: head_dim 16), an offloader at budget 256, a reader or a sparse prefill
    at 64, the rest at half the prompt (scope also evicting among its few generated tokens)."""
    small = {"group_size": 8} if "group_size" in METHODS[name].options else {}  # mustafar: no groups
    if name == "full" or name in QUANTIZERS or METHODS[name].blends:
        return make_method(name, **small)
    if METHODS[name].offloads:
        return make_method(name, budget=256)
    if METHODS[name].selects_pages or METHODS[name].sparse_prefill:
        return make_method(name, budget=64)
    # scope evicts among the generated tokens only, past a window of its own
    scope = dict(decoding_window_size=4, decoding_recent_size=2) if name == "scope" else {}
    return make_method(name, compression=0.5, **small, **scope)


def test_batch_buckets_are_nano_vllms():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(256)[-3:] == [224, 240, 256]


# padding rows attend over nothing: the interpreter warns of the 0 / 0 their output is
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:divide by zero encountered:RuntimeWarning",
                            "ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("kernels", ["cpu", "triton"])
@pytest.mark.parametrize("name", list(GRAPH_METHODS))
def test_the_graphs_buffers_give_the_eager_tokens(tiny, kernels, name):
    """Five prompts (a bucket of 8: three padding rows), heads of different lengths (snapkv), the
    tables a method picks from (quest), a merged layer pair (minicache)."""
    model, cfg = tiny
    method = name and make_method(name, **GRAPH_METHODS[name])
    made = []

    def graphs(model, cache):
        made.append(DecodeGraphs(model, cache, 8, capture=False))
        return made[-1]

    expected = greedy(model, cfg, PROMPTS, kernels, method=method)
    assert greedy(model, cfg, PROMPTS, kernels, method=method, graphs=graphs) == expected
    [static] = made
    # all five prompts decoded in the 8-row bucket, tables in widths of powers of two
    assert 8 in {batch for batch, _, _ in static.steps}
    assert all(width & (width - 1) == 0 for _, width, _ in static.steps)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", CAPTURED_EVICTORS)
def test_an_evictors_graph_buffers_give_the_eager_tokens(tiny, name):
    """Every evictor whose decode is captured, at half the prompt: the batch in one group padded to
    its bucket (three padding rows that evict nothing), its budgets and counts in the graph's
    buffers, one graph per pattern of rounds. Eagerly the batch goes in groups of similar length."""
    model, cfg = tiny
    made = []

    def graphs(model, cache):
        made.append(DecodeGraphs(model, cache, 8, capture=False))
        return made[-1]

    expected = greedy(model, cfg, PROMPTS, "cpu", method=sample_method(name))
    assert greedy(model, cfg, PROMPTS, "cpu", method=sample_method(name), graphs=graphs) == expected
    [static] = made
    patterns = {rounds for _, _, rounds in static.steps}
    assert any(1 in rounds for rounds in patterns) and all(max(r) <= 1 for r in patterns)


class ReplayedGraph:
    """A CUDA graph emulated on the CPU: recording runs nothing, and a replay runs the step again
    with the StepAttention of the step that captured it, so every value the host worked out then is
    the capture's, as in a real graph; only what the graph's buffers hold is the replaying step's."""

    def __init__(self, graphs, step, attention):
        self.graphs, self.step, self.attention = graphs, step, attention

    def replay(self):
        attention, step = self.attention, self.step
        attention.bytes_read = 0
        if attention.evicting:  # the buffer the recorded kernels write (the engine reads a view of it)
            attention.evicted = step.evicted
        step.hidden = self.graphs.model(step.ids, step.positions, attention)
        step.bytes_read = attention.bytes_read


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", [None, "snapkv", "quest", "minicache", *CAPTURED_EVICTORS])
def test_a_replay_reads_every_step_input_from_the_graphs_buffers(tiny, monkeypatch, name):
    """Replays that see only the capturing step's host values (ReplayedGraph) still give the eager
    tokens: nothing a decode step works out on the host is frozen into its graph, beyond the key.
    The requests end one after another, so a graph replays for other sequences than it captured."""
    model, cfg = tiny

    def record(self, step, attention):
        step.graph = ReplayedGraph(self, step, attention)

    monkeypatch.setattr(DecodeGraphs, "_record", record)
    made = []

    def graphs(model, cache):
        made.append(DecodeGraphs(model, cache, 8, capture=True))
        return made[-1]

    def method():
        if name is None or name in GRAPH_METHODS:
            return name and make_method(name, **GRAPH_METHODS[name])
        return sample_method(name)

    steps = [3, 14, 6, 11, 8]
    expected = greedy(model, cfg, PROMPTS, "cpu", steps, method())
    assert greedy(model, cfg, PROMPTS, "cpu", steps, method(), graphs=graphs) == expected
    assert made[0].replays > 0 and made[0].failure is None


def test_tables_wider_than_max_len_to_capture_run_eagerly(tiny):
    """At max_len_to_capture=32 tokens (8 blocks of 4), the steps after the 23-token prompt has
    grown past 32 run eagerly (same tokens), the earlier ones in graphs no wider than 8 blocks, and
    the tables storage stays within most_table_bytes."""
    model, cfg = tiny
    made, taken = [], []

    def graphs(model, cache):
        made.append(DecodeGraphs(model, cache, 8, capture=False, max_len_to_capture=32))
        takes = made[-1].takes
        made[-1].takes = lambda attention: taken.append(takes(attention)) or taken[-1]
        return made[-1]

    assert greedy(model, cfg, PROMPTS[:3], "cpu", graphs=graphs) == greedy(model, cfg, PROMPTS[:3], "cpu")
    [static] = made
    assert True in taken and False in taken
    assert {width for _, width, _ in static.steps} <= {1, 2, 4, 8}
    assert static.table_storage.nbytes <= most_table_bytes(cfg.num_layers, cfg.num_kv_heads, 8, 4, 32)


def test_the_pool_leaves_room_for_the_tables_at_their_most(monkeypatch):
    """The default GPU pool is 90% of free memory less what the tables can take: for the 1B shape
    (16 layers, 8 kv-heads, a 131,072-token context) with 256 sequences, 16 x 257 x 8 x 8,192
    int32 ids of mirror and 2 x 16 x 256 x 8 x 512 int64 ids of graph tables."""
    from pathlib import Path

    import nanokv.engine.llm as llm_module
    from nanokv.cache.build import CacheRequest
    from nanokv.config import ModelConfig

    cfg = ModelConfig.from_json_file(Path(llm_module.__file__).parents[1] / "models" / "configs" / "llama3.2-1b.json")
    mirror, graph_tables = 16 * 257 * 8 * 8192 * 4, 2 * 16 * 256 * 8 * 512 * 8
    assert llm_module.table_bytes(CacheRequest(), cfg, 16, 256, graphs=True) == mirror + graph_tables
    assert llm_module.table_bytes(CacheRequest(), cfg, 16, 256, graphs=False) == mirror
    assert llm_module.table_bytes(CacheRequest(key_channels=64), cfg, 16, 256, graphs=False) == 2 * mirror
    monkeypatch.setattr(llm_module, "available_memory", lambda device: 80 << 30)
    assert llm_module.kv_cache_bytes(None, "cuda", mirror + graph_tables) == int(0.9 * (80 << 30)) - mirror - graph_tables
    assert llm_module.kv_cache_bytes(1 << 30, "cuda", mirror) == 1 << 30  # bytes given: the pool's own


def test_padding_rows_write_only_the_scratch_block(tiny):
    """A pool whose every other block is NaN before a run: the static path's tokens still match,
    so no padding row wrote where a sequence reads, and padding never read NaN into a real row."""
    model, cfg = tiny
    made = []

    def graphs(model, cache):
        free = cache.pool._free[:cache.pool.num_free]
        cache.pool.k[free[free > 0]] = float("nan")
        cache.pool.v[free[free > 0]] = float("nan")
        made.append(DecodeGraphs(model, cache, 8, capture=False))
        return made[-1]

    assert greedy(model, cfg, PROMPTS[:3], "cpu", graphs=graphs) == greedy(model, cfg, PROMPTS[:3], "cpu")
    assert made[0].steps and made[0].replays == 0  # ran the buffers eagerly: nothing captured on a CPU


# the calibrated methods need a profile to pick their block kind: lorc and palu's latent cache is
# checked by its class's reason, the others hold plain blocks
CALIBRATED = tuple(name for name, m in METHODS.items() if m.calibration)


def test_the_docs_table_lists_every_method():
    assert sorted(documented_reasons()) == sorted(METHODS)
    assert documented_reasons()["lorc"] == LatentKVCache.eager_decode_reason
    assert all(documented_reasons()[name] is None for name in CALIBRATED
               if not (METHODS[name].stores_latents or name in QUANTIZERS or METHODS[name].selects_pages))
    for name in (n for n in CALIBRATED if METHODS[n].selects_pages):  # their reason is the method's own
        assert eager_reason(make_method(name, budget=64), None, "triton", "cuda", False) == documented_reasons()[name]


@pytest.mark.parametrize("name", [n for n in METHODS if n not in CALIBRATED])
def test_each_method_says_whether_its_decode_is_captured(name, tiny):
    """The reason the engine gives, for a CUDA device with the Triton kernels, against the docs'
    table (docs/architecture.md)."""
    model, cfg = tiny
    method = sample_method(name)
    cache = build_cache(method.cache_request(cfg.num_layers, cfg.head_dim), cfg, 1 << 20, 4, torch.float32, "cpu",
                        model.inv_freq, 1 << 20)
    assert eager_reason(method, cache, "triton", "cuda", False) == documented_reasons()[name]


def documented_reasons() -> dict:
    """{method: None (captured) or why not}, from the table in docs/architecture.md."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    table = text.split("<!-- decode-graphs -->")[1]
    rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[2:] if line.startswith("|")]
    reasons = {}
    for names, captured, why in rows:
        for n in names.replace("`", "").split(","):
            reasons[n.strip()] = None if captured.strip() == "yes" else why.strip().format(method=n.strip())
    return reasons


def test_the_engine_reports_why_decode_is_eager():
    assert eager_reason(None, None, "triton", "cuda", True) == "enforce_eager is set"
    assert eager_reason(None, None, "triton", "cpu", False) == "CUDA graphs need a CUDA device"
    assert eager_reason(None, None, "reference", "cuda", False) == "the 'reference' kernels (graphs replay the Triton ones)"
    llm = LLM("smollm2-135m", load_format="dummy", device="cpu", dtype="float32", kv_cache_memory=8 << 20,
              enforce_eager=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert llm.stats["decode_graphs"] == {"replayed_steps": 0, "eager_steps": 2, "graphs": 0, "capture_s": 0.0,
                                          "eager_reason": "enforce_eager is set"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["full", "snapkv", "quest", "h2o", "tova", "cam", "keyformer", "keepkv"])
def test_captured_graphs_give_the_eager_tokens_on_cuda(name):
    """float32, random SmolLM2 weights: batches that cross buckets (1, 3, 9 rows) and table widths.
    Replaying a graph gives exactly what running its buffers eagerly gives. Against the plain eager
    engine the decode kernel splits each head's keys differently (the graph sees its bucket and its
    padded width), so sums come in another order: most tokens agree, a near-tie may not."""
    options = {"budget": 8} if name == "quest" else {} if name == "full" else {"compression": 0.5}
    llm = LLM("smollm2-135m", load_format="dummy", device="cuda", dtype="float32", kv_cache_memory=256 << 20,
              method=name, **options)
    assert llm.eager_reason is None
    prompts = [[(i * 31 + j) % 1000 + 1 for j in range(n)] for i, n in enumerate((5, 40, 300, 17, 90, 3, 64, 128, 33))]
    params = [SamplingParams(max_tokens=8 + 4 * i, ignore_eos=True) for i in range(len(prompts))]
    graphed = [o.token_ids for o in llm.generate(prompts, params)]
    stats, graphs = llm.stats["decode_graphs"], llm.runner.graphs
    assert graphs.failure is None and len(graphs.steps) >= 3 and graphs.replays > 0
    # the only eager steps are those that captured a graph (each ran as its warm-up)
    assert stats["replayed_steps"] == graphs.replays and stats["eager_steps"] == stats["graphs"]
    llm.runner.graphs = DecodeGraphs(llm.model, llm.cache, graphs.buckets[-1], capture=False)
    assert [o.token_ids for o in llm.generate(prompts, params)] == graphed
    llm.runner.graphs = None
    eager = [o.token_ids for o in llm.generate(prompts, params)]
    pairs = [(a, b) for g, e in zip(graphed, eager) for a, b in zip(g, e)]
    assert sum(a == b for a, b in pairs) >= 0.9 * len(pairs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("method", ["full", "h2o"])
def test_preemption_under_the_graphs_buffers_recomputes_the_same_tokens(tmp_path, method):
    """A pool too small for every request: sequences are preempted (their rows of the tables' mirror
    freed and handed to others) and recomputed, batches shrink and grow across buckets, and the
    tokens equal an eager engine's with room to spare (H2O: its evictions replayed on recompute)."""
    from helpers import assert_preemption_repeats
    from test_dummy import tiny_config

    config, made = tiny_config(tmp_path), []
    options = dict(budget=20) if method == "h2o" else {}

    def make_llm(**kwargs):
        llm = LLM(config, load_format="dummy", dtype="float32", device="cpu", block_size=4, method=method,
                  **options, **kwargs)
        if kwargs:  # the tight one
            llm.runner.graphs = DecodeGraphs(llm.model, llm.cache, 8, capture=False)
            made.append(llm.runner.graphs)
        return llm

    prompts = [[(i * 13 + j) % 500 + 1 for j in range(n)] for i, n in enumerate((3, 17, 9, 30, 5, 22))]
    params = [SamplingParams(max_tokens=24 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    tight, _ = assert_preemption_repeats(make_llm, prompts, params, blocks=2 * 2 * 18)
    # the static buffers ran every decode step, eagerly: nothing is captured on a CPU
    assert tight.stats["decode_graphs"]["replayed_steps"] == 0 and tight.stats["decode_graphs"]["eager_steps"] > 0
    assert len({batch for batch, _, _ in made[0].steps}) >= 2


def test_a_capture_that_fails_turns_capturing_off_and_says_why(tmp_path, monkeypatch):
    """Something in a step that waits for the GPU makes its capture raise: that step and the rest
    run eagerly over the same buffers, with the same tokens, and the stats give the error."""
    from test_dummy import tiny_config

    def failing(self, step, attention):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_record", failing)
    llm = LLM(tiny_config(tmp_path), load_format="dummy", dtype="float32", device="cpu")
    prompts, params = [[5, 6, 7], [8, 9, 10, 11, 12]], SamplingParams(max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    llm.runner.graphs = DecodeGraphs(llm.model, llm.cache, 8, capture=True)
    llm.eager_reason = None  # as on a GPU, where graphs are on
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    stats = dict(llm.stats["decode_graphs"])
    assert stats.pop("capture_s") >= 0
    assert stats == {
        "replayed_steps": 0, "eager_steps": 5, "graphs": 1,
        "eager_reason": "capturing a decode step failed: operation not permitted when stream is capturing"}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", [n for n, why in documented_reasons().items() if why is None])
def test_a_captured_decode_layer_reads_nothing_back_to_the_host(tiny, monkeypatch, name):
    """Every method the docs list as captured, through the graphs' buffers with the Triton kernels
    (a calibrated one with a made-up profile): its decode layers make no call that waits for the GPU
    (a read-back, a copy from the host, a count: test_kernels_engine.count_readbacks), which would
    make a capture fail."""
    model, cfg = tiny
    m, L, H = METHODS[name], cfg.num_layers, cfg.num_kv_heads
    scores = [[(3 * layer + head) % 5 / 5 for head in range(H)] for layer in range(L)]
    profiles = {"duoattention": {"head_scores": scores}, "headkv": {"head_scores": scores},
                "retrieval_head": {"head_scores": [[s / 4 for s in row] for row in scores]},  # some above 0.1
                "razorattention": {"head_scores": scores, "echo_scores": scores},
                "kvsharer": {"pairs": [[L - 1, 0]], "num_layers": L},
                "minference": {"patterns": [[(layer + h) % 3 for h in range(cfg.num_heads)] for layer in range(L)]}}
    method = sample_method(name)
    if m.calibration:
        method.bind_calibration(profiles[name])
    if method.needs_vocabulary:  # what the engine binds: each token id's text (made up here)
        method.bind_vocabulary([f"w{i}" if i % 7 else "." for i in range(cfg.vocab_size)])
    counts = count_readbacks(monkeypatch, "__call__")
    greedy(model, cfg, PROMPTS[:2], "triton", steps=4, method=method,
           graphs=lambda model, cache: DecodeGraphs(model, cache, 8, capture=False))
    assert counts == {}
