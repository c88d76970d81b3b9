"""Sparse prefill methods (F12): critiprefill and minference. Hand-built masks where the right tiles
are known by construction (a critical key block, a vertical line and a slash diagonal, the A-shape,
a preferred block), each against a plain restatement of its rule; the engine's greedy tokens equal a
plain restatement's; a budget covering everything gives full's tokens; FLOPs fall with the budget;
bad options are refused; the calibration command writes an artifact minference loads."""

import json
import math
import re

import pytest
import torch

from helpers import DenseLayers, restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods.base import SparsePrefillView
from nanokv.methods.critiprefill import CritiPrefill
from nanokv.methods.minference import PATTERNS, MInference

PROMPTS = [list(range(10, 10 + n)) for n in (40, 75, 100)]
CRITI = dict(segment_size=16, tile_size=8, threshold_len=16, layer_skip=0)  # every layer of the tiny models sparse


def view(q, k, layer=0, state=None):
    return SparsePrefillView(layer, 2, q, k, torch.arange(len(q)), {} if state is None else state)


# --- critiprefill ---------------------------------------------------------------------------------

def test_critiprefill_segments_attend_to_their_critical_block():
    T, D, u = 64, 16, torch.zeros(16)
    u[0] = 1.0
    gen = torch.Generator().manual_seed(0)
    q = (u + 0.01 * torch.randn(T, 4, D, generator=gen))            # every query points along u (4 heads)
    k = 0.01 * torch.randn(T, 2, D, generator=gen)
    k[8:16, 0] += 3 * u                                             # kv-head 0: block 1 is critical
    k[0:8, 1] += 3 * u                                              # kv-head 1: block 0
    m = CritiPrefill(budget=8, **{**CRITI, "layer_skip": 1})        # one block per segment
    mask = m.tile_mask(view(q, k, layer=1))
    lower = torch.ones(8, 8, dtype=torch.bool).tril()
    want = lower.repeat(4, 1, 1)
    for head, block in ((0, 1), (1, 1), (2, 0), (3, 0)):            # query heads 0, 1 read kv-head 0
        for s in (1, 2):                                            # segment 0 has no block before it; 3 is last
            rows = slice(2 * s, 2 * s + 2)
            want[head, rows] = False
            want[head, rows, block] = True
            want[head, rows, rows] = lower[rows, rows]
    assert torch.equal(mask, want)
    assert m.tile_mask(view(q, k, layer=0)) is None                 # layer_skip=1: layer 0 is dense


def test_critiprefill_criticality_is_the_official_max_min_estimate_with_layer_fusion():
    gen = torch.Generator().manual_seed(1)
    T, Hq, H, D, S, B = 48, 4, 2, 8, 16, 8
    m = CritiPrefill(budget=8, **CRITI)
    state = {}
    weights = []
    for layer in (1, 2):
        q, k = torch.randn(T, Hq, D, generator=gen), torch.randn(T, H, D, generator=gen)
        m.prefill_blocks(view(q, k, layer, state))
        # stated plainly: per segment and block, per query head, then the mean over the group
        pool = 32
        w = torch.full((H, pool // S, pool // B), torch.finfo(torch.float32).min)
        for h in range(H):
            for s in range(pool // S):
                for b in range(s * S // B):                         # the blocks before the segment
                    per_head = []
                    for g in range(2 * h, 2 * h + 2):
                        qs, kb = q[s * S:(s + 1) * S, g], k[b * B:(b + 1) * B, h]
                        qmax, qmin, kmax, kmin = qs.max(0).values, qs.min(0).values, kb.max(0).values, kb.min(0).values
                        per_head.append(max((qmax @ kmax + qmin @ kmax) / 2, (qmax @ kmin + qmin @ kmin) / 2))
                    w[h, s, b] = sum(per_head) / 2
        w = w.softmax(-1)
        weights.append(w if layer == 1 else 0.25 * weights[-1] + 0.75 * w)
        assert torch.allclose(state["critiprefill"], weights[-1], atol=1e-5)


class SparsePrompt(DenseLayers):
    """A sparse prefill stated plainly: `dense` (the prompt) knows its layer; decode is dense."""

    def __call__(self, layer, q, k, v, sliding_window):
        self.layer = layer
        return super().__call__(layer, q, k, v, sliding_window)

    def decode(self, layer, q, keys, values):
        return super().dense(q, keys, values)


class CritiRestated(SparsePrompt):
    """critiprefill stated plainly over one prompt: per sparse segment and kv-head, the blocks before it
    scored by the max/min estimate, softmaxed, fused with the previous layer's, the top ones and the
    segment itself attended; everything else dense."""

    def __init__(self, budget, segment=16, block=8, threshold=16, skip=0):
        super().__init__()
        self.budget, self.S, self.B, self.threshold, self.skip, self.previous = budget, segment, block, threshold, skip, None

    def dense(self, q, keys, values):
        T, S, B = len(q), self.S, self.B
        segments = math.ceil(T / S)
        sparse = [s for s in range(segments - 1) if s * S >= self.threshold]
        if len(keys) != T or self.layer < self.skip or not sparse:
            return super().dense(q, keys, values)
        H, group = keys.shape[1], q.shape[1] // keys.shape[1]
        blocks = (segments - 1) * S // B
        w = torch.full((H, segments - 1, blocks), torch.finfo(torch.float32).min)
        for h in range(H):
            for s in range(segments - 1):
                for b in range(s * S // B):
                    total = 0.0
                    for g in range(h * group, (h + 1) * group):
                        qs, kb = q[s * S:(s + 1) * S, g], keys[b * B:(b + 1) * B, h]
                        qmax, qmin, kmax, kmin = qs.max(0).values, qs.min(0).values, kb.max(0).values, kb.min(0).values
                        total += max((qmax @ kmax + qmin @ kmax) / 2, (qmax @ kmin + qmin @ kmin) / 2)
                    w[h, s, b] = total / group
        w = w.softmax(-1)
        if self.previous is not None:
            w = 0.25 * self.previous + 0.75 * w
        self.previous = w
        out = torch.empty_like(q)
        for t in range(T):
            s = t // S
            for h in range(H):
                if s in sparse:
                    top = w[h, s].topk(min(self.budget // B, blocks)).indices.tolist()
                    index = [key for b in sorted(top) if b * B < s * S for key in range(b * B, (b + 1) * B)]
                    index = torch.tensor(index + list(range(s * S, t + 1)))
                else:
                    index = torch.arange(t + 1)
                heads = slice(h * group, (h + 1) * group)
                out[t:t + 1, heads] = attention_by_position(q[t:t + 1, heads], keys[index, h:h + 1],
                                                            values[index, h:h + 1], self.positions[t:t + 1], index)
        return out


@pytest.fixture
def gqa(tiny_gqa_dir):
    from nanokv import LLM

    return lambda method="full", **kw: LLM(str(tiny_gqa_dir), dtype="float32", method=method, **kw)


def greedy(llm, prompts=PROMPTS, steps=6):
    from nanokv import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))]


def test_critiprefill_engine_tokens_equal_a_plain_restatement(gqa):
    from nanokv.loading import load_model

    llm = gqa("critiprefill", budget=8, **CRITI)
    model, _ = load_model("hf_dir", llm.source.path, torch.float32)
    got = greedy(llm, steps=4)
    assert got == [restated_greedy(model, CritiRestated(8), p, 4) for p in PROMPTS]
    assert got != greedy(gqa(), steps=4)  # the skipped blocks mattered
    assert llm.stats["prefill_attention_flops"] < llm.stats["prefill_attention_flops_dense"]


def test_critiprefill_budget_covering_everything_gives_full_and_flops_fall_with_the_budget(gqa):
    full = gqa()
    expected = greedy(full)
    roomy = gqa("critiprefill", budget=4096, **CRITI)
    assert greedy(roomy) == expected
    assert roomy.stats["prefill_attention_flops"] == roomy.stats["prefill_attention_flops_dense"]
    assert roomy.stats["peak_kv_bytes"] == full.stats["peak_kv_bytes"]  # the cache is whole
    flops = []
    for budget in (32, 16, 8):  # the same engine at smaller budgets (read at each prefill)
        roomy.method.budget = budget
        greedy(roomy, PROMPTS[2:], steps=1)
        flops.append(roomy.stats["prefill_attention_flops"])
    assert flops[0] > flops[1] > flops[2]


@pytest.mark.parametrize("options, message", [
    ({"segment_size": 20, "tile_size": 8}, "segment_size=20 of method critiprefill must be a multiple of tile_size=8"),
    ({"tile_size": 12}, "tile_size=12 of method 'critiprefill' must be a power of two"),
    ({"budget": 16, "tile_size": 32}, "budget 16 is below one block"),
    ({"compression": 0.5}, "give --budget"),
    ({"layer_fusion": "maybe"}, "layer_fusion='maybe'"),
])
def test_critiprefill_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CritiPrefill(**options)


# --- minference -----------------------------------------------------------------------------------

def test_minference_a_shape_keeps_the_sink_tiles_and_the_local_window():
    q, k = torch.randn(64, 2, 8), torch.randn(64, 1, 8)
    m = MInference(pattern="a_shape", budget=20, tile_size=8)       # 4 sinks, a window of 16
    mask = m.tile_mask(view(q, k))
    want = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        for j in range(i + 1):
            # a sink in key tile j, or a (query, key) pair in tile (i, j) closer than 16
            want[i, j] = j * 8 < 4 or any(qq - kk < 16 for qq in range(i * 8, i * 8 + 8) for kk in range(j * 8, j * 8 + 8)
                                          if kk <= qq)
    assert torch.equal(mask, want.expand(2, 8, 8))
    assert not want.tril().all()


def vertical_slash_restated(q, k, columns, diagonals, forced, last_q, tile):
    """The tiles crossed by the chosen columns and diagonals, pair by pair."""
    T, Hq, D = q.shape
    n = math.ceil(T / tile)
    mask = torch.zeros(Hq, n, n, dtype=torch.bool)
    picks = []
    for h in range(Hq):
        kh = k[:, h // (Hq // k.shape[1])]
        W = min(last_q, T)
        vertical, slash = torch.zeros(T), torch.zeros(T)
        for w in range(T - W, T):
            p = (q[w, h] @ kh[:w + 1].T / math.sqrt(D)).softmax(-1)
            for key in range(w + 1):
                vertical[key] += p[key]
                slash[w - key] += p[key]
        vertical[:forced], slash[:forced] = float("inf"), float("inf")
        cols, offs = set(vertical.topk(columns).indices.tolist()), set(slash.topk(diagonals).indices.tolist())
        picks.append((cols, offs))
        for t in range(T):
            for key in range(t + 1):
                if key in cols or t - key in offs:
                    mask[h, t // tile, key // tile] = True
    return mask | torch.eye(n, dtype=torch.bool), picks


def test_minference_vertical_slash_picks_a_strong_column_and_diagonal():
    T, D = 64, 128
    q, k = torch.zeros(T, 2, D), torch.zeros(T, 1, D)
    for t in range(T):
        q[t, :, 0] = 1.0
        q[t, :, 1 + t] = 10.0                # query t matches key t - 5 alone: a slash at offset 5
        if t >= 5:
            k[t - 5, 0, 1 + t] = 10.0
    k[45, 0, 0] = 90.0                       # every query matches key 45: a vertical line
    m = MInference(pattern="vertical_slash", budget=10, tile_size=8)   # 2 columns, 8 diagonals
    m.forced = 0
    mask = m.tile_mask(view(q, k))
    want, picks = vertical_slash_restated(q, k, 2, 8, 0, 64, 8)
    assert all(45 in cols and 5 in offs for cols, offs in picks)
    assert torch.equal(mask, want & torch.ones(8, 8, dtype=torch.bool).tril())
    assert mask[:, 5:, 5].all()              # key 45's tile, for every query tile from its own
    assert mask[:, 7, 6].all() and not mask.all()


def test_minference_vertical_slash_with_the_official_forced_lines_matches_a_restatement():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(256, 4, 16, generator=gen), torch.randn(256, 2, 16, generator=gen)
    m = MInference(pattern="vertical_slash", budget=160, tile_size=16)  # 32 columns, 128 diagonals
    want, _ = vertical_slash_restated(q, k, 32, 128, 30, 64, 16)
    mask = m.tile_mask(view(q, k))
    assert torch.equal(mask, want & torch.ones(16, 16, dtype=torch.bool).tril())
    assert not mask.all()


def test_minference_block_sparse_picks_the_block_of_highest_pooled_score():
    T, D = 64, 8
    gen = torch.Generator().manual_seed(4)
    q, k = 0.01 * torch.randn(T, 2, D, generator=gen), 0.01 * torch.randn(T, 1, D, generator=gen)
    q[:, 0, 0] = 1.0                          # query head 0 prefers key tile 2, head 1 key tile 5
    q[:, 1, 1] = 1.0
    k[16:24, 0, 0] = 2.0
    k[40:48, 0, 1] = 2.0
    mask = MInference(pattern="block_sparse", budget=8, tile_size=8).tile_mask(view(q, k))   # one block a row
    for head, block in ((0, 2), (1, 5)):
        for i in range(8):
            want = {i} | ({block} if i >= block else set())
            if i < block:  # before its block, a row's one pick is some earlier tile: only count them
                assert mask[head, i].sum() <= 2 and mask[head, i, i]
            else:
                assert set(mask[head, i].nonzero().flatten().tolist()) == want


class MaskRestated(SparsePrompt):
    """A prompt attends, per query head, to the keys of the tiles `masks(layer, q, keys)` keeps,
    causally, stated pair by pair; decode is dense."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def dense(self, q, keys, values):
        T = len(q)
        mask = self.method.tile_mask(view(q, keys, self.layer)) if len(keys) == T else None
        if mask is None:
            return super().dense(q, keys, values)
        tile, group = self.method.tile_size, q.shape[1] // keys.shape[1]
        out = torch.empty_like(q)
        for t in range(T):
            for h in range(q.shape[1]):
                index = torch.tensor([key for key in range(t + 1) if mask[h, t // tile, key // tile]])
                out[t:t + 1, h:h + 1] = attention_by_position(q[t:t + 1, h:h + 1], keys[index, h // group:h // group + 1],
                                                              values[index, h // group:h // group + 1],
                                                              self.positions[t:t + 1], index)
        return out


@pytest.mark.parametrize("pattern, budget", [("vertical_slash", 40), ("block_sparse", 32), ("a_shape", 20)])
def test_minference_engine_tokens_equal_a_plain_restatement(gqa, pattern, budget):
    from nanokv.loading import load_model

    options = dict(pattern=pattern, budget=budget, tile_size=8)
    llm = gqa("minference", **options)
    model, _ = load_model("hf_dir", llm.source.path, torch.float32)
    prompts = PROMPTS[1:]
    got = greedy(llm, prompts, steps=3)
    assert got == [restated_greedy(model, MaskRestated(MInference(**options)), p, 3) for p in prompts]
    assert llm.stats["prefill_attention_flops"] < llm.stats["prefill_attention_flops_dense"]


def test_minference_budget_covering_everything_gives_full_and_flops_fall_with_the_budget(gqa):
    expected = greedy(gqa())
    for pattern in PATTERNS:
        llm = gqa("minference", pattern=pattern, budget=4096, tile_size=8)
        assert greedy(llm) == expected
        assert llm.stats["prefill_attention_flops"] == llm.stats["prefill_attention_flops_dense"]
        flops = []
        for budget in (60, 30, 10):  # the same engine at smaller budgets (read at each prefill)
            llm.method.budget = budget
            greedy(llm, PROMPTS[2:], steps=1)
            flops.append(llm.stats["prefill_attention_flops"])
        assert flops[0] >= flops[1] >= flops[2] and flops[0] > flops[2], (pattern, flops)


@pytest.mark.parametrize("options, message", [
    ({"pattern": "diagonal"}, "pattern='diagonal' of method 'minference' must be calibrated or one of a_shape"),
    ({"pattern": "a_shape", "budget": 3}, "budget 3 leaves no room"),
    ({"pattern": "a_shape", "tile_size": 48}, "tile_size=48 of method 'minference' must be a power of two"),
    ({"pattern": "a_shape", "last_q": 0}, "last_q=0 of method 'minference'"),
])
def test_minference_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MInference(**options)


def test_minference_calibration_writes_an_artifact_the_method_loads(tiny_gqa_dir, monkeypatch, tmp_path, capsys):
    from nanokv import LLM
    from nanokv.artifacts import model_key
    from nanokv.calibrate import cli

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate minference --model {tiny_gqa_dir}")):
        LLM(str(tiny_gqa_dir), dtype="float32", method="minference")
    assert cli.main(["minference", "--model", str(tiny_gqa_dir), "--length", "256", "--device", "cpu"]) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_gqa_dir)) / "minference.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    artifact = json.loads(path.read_text())
    assert (artifact["method"], artifact["num_layers"], artifact["num_kv_heads"]) == ("minference", 2, 2)
    assert artifact["settings"]["samples"] == 1 and artifact["settings"]["budget"] == 64
    recalls = torch.tensor(artifact["recalls"])                       # [L, Hq, 3]
    assert recalls.shape == (2, 4, 3) and bool(((recalls > 0) & (recalls <= 1 + 1e-6)).all())
    assert artifact["patterns"] == recalls.argmax(-1).tolist()        # each head's best recall
    llm = LLM(str(tiny_gqa_dir), dtype="float32", method="minference", budget=40, tile_size=8)
    assert llm.method.patterns.tolist() == artifact["patterns"]
    greedy(llm)
    assert llm.stats["prefill_attention_flops"] < llm.stats["prefill_attention_flops_dense"]
    artifact["patterns"][0][0] = 7                                    # not a pattern id
    path.write_text(json.dumps(artifact))
    with pytest.raises(ValueError, match="patterns is not 2 lists of one pattern id"):
        LLM(str(tiny_gqa_dir), dtype="float32", method="minference")
