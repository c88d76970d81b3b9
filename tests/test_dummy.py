"""--load-format dummy: random weights of a shipped (or given) config.json, a byte tokenizer, and
transformers built from the same config holding the same weights (what bench.py --compare hf runs)."""

import json

import pytest
import torch
import transformers as T

from helpers import nanokv_logits
from nanokv.config import ModelConfig
from nanokv.hub import MODELS, config_file, shipped_configs
from nanokv.loading import dummy_model, hf_tensors
from nanokv.models import MODEL_CLASSES

# short name -> (architecture, layers, query heads, kv heads, head_dim), from the published configs
SHAPES = {
    "llama3-8b": ("llama", 32, 32, 8, 128),
    "llama3.1-8b": ("llama", 32, 32, 8, 128),
    "llama3.2-1b": ("llama", 16, 32, 8, 64),
    "mistral-7b": ("mistral", 32, 32, 8, 128),
    "qwen2.5-7b": ("qwen2", 28, 28, 4, 128),
    "qwen2.5-coder-0.5b": ("qwen2", 24, 14, 2, 64),
    "qwen2.5-coder-1.5b": ("qwen2", 28, 12, 2, 128),
    "qwen3-8b": ("qwen3", 36, 32, 8, 128),
    "smollm2-135m": ("llama", 30, 9, 3, 64),
}


def tiny_config(tmp_path, model_type="llama", **extra) -> str:
    """A config.json of a few-layer model, written to tmp_path -> its path."""
    cfg = dict(model_type=model_type, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
               rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False)
    cfg.update(extra)
    path = tmp_path / f"{model_type}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# --- shipped configs ---------------------------------------------------------------------------

def test_every_short_name_ships_a_config():
    assert shipped_configs() == sorted(MODELS) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shipped_config_parses_and_fits_transformers(name):
    """Our reading of the file has the published shape, and transformers' model of the same file has
    exactly the weights (names and shapes) that hf_tensors makes of ours: both built on meta, no memory."""
    cfg = ModelConfig.from_json_file(config_file(name))
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == SHAPES[name]
    assert cfg.rope_scaling.get("rope_type", "default") == ("llama3" if name in ("llama3.1-8b", "llama3.2-1b") else "default")
    assert cfg.attention_bias == (cfg.architecture == "qwen2") and cfg.qk_norm == (cfg.architecture == "qwen3")
    assert cfg.sliding_windows == [None] * cfg.num_layers  # Mistral v0.3 has none; Qwen's is switched off
    with torch.device("meta"):
        ours = MODEL_CLASSES[cfg.architecture](cfg)
        theirs = T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(config_file(name)))
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    if cfg.tie_word_embeddings:
        del expected["lm_head.weight"]  # the embedding matrix, listed once on our side
    assert {k: tuple(v.shape) for k, v in hf_tensors(ours)} == expected


def test_unknown_dummy_name_lists_the_shipped_ones():
    from nanokv import LLM

    with pytest.raises(ValueError) as e:
        LLM("gpt-5", load_format="dummy", device="cpu")
    message = str(e.value)
    assert "\n" not in message and "'gpt-5'" in message
    assert all(name in message for name in SHAPES)


def test_unknown_load_format_lists_the_valid_ones():
    from nanokv import LLM

    with pytest.raises(ValueError, match=r"^unknown load_format 'safetensors'; valid: auto, dummy$"):
        LLM("smollm2-135m", load_format="safetensors")


# --- random weights ----------------------------------------------------------------------------

def test_same_seed_gives_the_same_weights(tmp_path):
    cfg = ModelConfig.from_json_file(tiny_config(tmp_path, "qwen2"))
    first, again, other = (dict(dummy_model(cfg, torch.float32, seed=s).named_parameters()) for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["embed_tokens.weight"], other["embed_tokens.weight"])
    # transformers' Llama init: normal(0, initializer_range) weights, zero biases, unit norms
    assert abs(first["layers.0.mlp.gate_up_proj.weight"].std().item() - 0.2) < 0.01
    assert not first["layers.0.self_attn.qkv_proj.bias"].any()
    assert torch.equal(first["norm.weight"], torch.ones(64))


def test_byte_tokenizer_stays_in_the_vocabulary():
    from nanokv.tokenizer import Tokenizer

    tok = Tokenizer.from_bytes(300)
    ids = tok.encode("héllo 世界")
    assert ids == list("héllo 世界".encode())
    assert tok.decode(ids + [299]) == "héllo 世界<299>"
    assert tok.vocab_size == 300 and not tok.stop_token_ids and not tok.has_chat_template
    with pytest.raises(ValueError, match="at least 256"):
        Tokenizer.from_bytes(100)


def test_dummy_llm_generates(tmp_path):
    from nanokv import LLM, SamplingParams

    llm = LLM(tiny_config(tmp_path, tie_word_embeddings=True), load_format="dummy", dtype="float32",
              device="cpu", kv_cache_memory=4 << 20)
    [out] = llm.generate("hello", SamplingParams(max_tokens=8, ignore_eos=True))
    assert out.prompt_token_ids == list(b"hello")  # raw bytes: no template, no BOS
    assert len(out.token_ids) == 8 and all(0 <= t < 512 for t in out.token_ids)
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_shipped_smollm2_runs_with_dummy_weights():
    from nanokv import LLM, SamplingParams

    llm = LLM("smollm2-135m", load_format="dummy", dtype="float32", device="cpu", kv_cache_memory=8 << 20)
    assert llm.config.vocab_size == 49152 and llm.tokenizer.vocab_size == 49152
    [out] = llm.generate([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 32}),
])
def test_transformers_with_our_weights_gives_our_logits(tmp_path, model_type, extra):
    from nanokv.cli.bench import hf_copy

    path = tiny_config(tmp_path, model_type, **extra)
    cfg = ModelConfig.from_json_file(path)
    model = dummy_model(cfg, torch.float32, pack=False)
    with torch.no_grad():  # dummy biases are 0 and norms 1: make them count, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    hf = hf_copy(model, path, torch.float32, "cpu")
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = nanokv_logits(model, cfg, ids)
    assert ref.abs().max() > 0.5
    assert (ours - ref).abs().max().item() < 1e-4


# --- command lines -----------------------------------------------------------------------------

def test_generate_with_dummy_weights(tmp_path, capsys):
    from nanokv.cli.generate import main

    rc = main(["--model", tiny_config(tmp_path), "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
               "--kv-cache-memory", "4000000", "--max-tokens", "5", "hi"])
    assert rc == 0
    assert "generated 5 tok" in capsys.readouterr().err


def test_bench_runs_both_engines_on_dummy_weights(tmp_path):
    from nanokv.cli.bench import parse_args, run_hf, run_nanokv

    args = parse_args(["--model", tiny_config(tmp_path), "--load-format", "dummy", "--device", "cpu",
                       "--num-requests", "2", "--min-input", "8", "--max-input", "16", "--min-output", "2",
                       "--max-output", "4", "--single-output", "3", "--kv-cache-memory", "4000000"])
    for figures in (run_nanokv(args), run_hf(args)):  # --dtype auto resolves on both sides
        assert figures["output_tokens_per_s"] > 0 and figures["peak_gpu_bytes"] is None


def test_bench_profile_traces_the_decode_steps(tmp_path, capsys):
    """--profile writes a Chrome trace in which each engine step is a span, and prints the busiest
    operators; the figures include the share of the KV pool the run used at its peak."""
    import json

    from nanokv.cli.bench import PROFILE_STEPS, parse_args, run_hf, run_nanokv

    trace = tmp_path / "trace.json"
    args = parse_args(["--model", tiny_config(tmp_path), "--load-format", "dummy", "--device", "cpu",
                       "--num-requests", "3", "--min-input", "8", "--max-input", "16", "--min-output", "2",
                       "--max-output", "4", "--single-output", "0", "--kv-cache-memory", "4000000",
                       "--profile", str(trace)])
    figures = run_nanokv(args)
    assert 0 < figures["kv_pool_peak_share"] < 1
    spans = [e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name", "").startswith("nanokv.")]
    # one prefill step for the batch (3 requests: fewer than PROFILE_REQUESTS), then a step per token after the first
    assert spans.count("nanokv.prefill_step") == 1 and spans.count("nanokv.decode_step") == PROFILE_STEPS
    err = capsys.readouterr().err
    assert f"profile of 3 requests x {PROFILE_STEPS} decode steps" in err and "Self CPU" in err
    trace.unlink()
    assert run_hf(args)["output_tokens_per_s"] > 0 and not trace.exists()  # the transformers side traces nothing


@pytest.mark.parametrize("argv, expected", [
    (["--load-format", "dummy", "--model", "gpt-5"], "no config for 'gpt-5'"),
    (["--device", "cuda"], "device 'cuda' is not available"),
])
@pytest.mark.parametrize("cli", ["generate", "bench"])
def test_bad_input_is_one_line_before_any_load(cli, argv, expected, monkeypatch, capsys):
    import nanokv.cli.bench as bench
    import nanokv.engine.llm as llm
    from nanokv.cli.generate import main as generate

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    def no_load(*args, **kwargs):
        raise AssertionError("a model load started")

    monkeypatch.setattr(llm, "LLM", no_load)
    monkeypatch.setattr(bench, "run_child", no_load)
    assert (generate if cli == "generate" else bench.main)(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("cli", ["generate", "bench"])
def test_unknown_load_format_is_refused_by_the_parser(cli, capsys):
    from nanokv.cli import bench, generate

    with pytest.raises(SystemExit) as e:
        (generate if cli == "generate" else bench).parse_args(["--load-format", "npz"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "auto" in err and "dummy" in err
