"""generate.py as a user meets it: bad input is one line on stderr and exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=ROOT)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_gguf(path: Path, arch="llama", tensor_type=gguf.GGMLQuantizationType.F32):
    """A tiny GGUF: enough metadata for the config, one tensor of the given type."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(16)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    else:  # raw bytes of the right size for a [16, 32] tensor of that type
        block, nbytes = gguf.GGML_QUANT_SIZES[tensor_type]
        w.add_tensor("token_embd.weight", np.zeros((16, 32 // block * nbytes), dtype=np.uint8),
                     raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf_dir(path: Path, model_type="llama") -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": model_type, "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    return path


def test_unknown_model():
    assert_one_line_error(run("--model", "no-such-model", "hi"), "no-such-model", "smollm2-135m")


def test_unknown_method():
    assert_one_line_error(run("--method", "magic", "hi"), "'magic'", "full")


@pytest.mark.parametrize("args, needles", [
    (["--method", "snapkv", "--compression", "1.5"], ["compression", "[0, 1)"]),
    (["--method", "snapkv", "--budget", "8"], ["budget=8", "window_size=32"]),
    (["--method", "snapkv", "--method-arg", "window=4"], ["'window'", "window_size"]),
    (["--method", "knorm", "--method-arg", "skip_layers=x"], ["skip_layers", "int"]),
    (["--method", "knorm", "--method-arg", "skip_layers"], ["KEY=VALUE"]),
])
def test_bad_method_settings(args, needles):
    assert_one_line_error(run(*args, "hi"), *needles)


def test_list_methods():
    result = run("--list-methods")
    assert result.returncode == 0
    for name in ("full", "random", "streaming_llm", "knorm", "snapkv", "arxiv.org/abs/2404.14469"):
        assert name in result.stdout


def test_missing_file(tmp_path):
    missing = tmp_path / "absent.gguf"
    assert_one_line_error(run("--model", str(missing), "hi"), str(missing))


def test_truncated_gguf(tmp_path):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) - 700])
    assert_one_line_error(run("--model", str(cut), "hi"), str(cut), "truncated")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    assert_one_line_error(run("--model", str(bad), "hi"), str(bad), "GGUF")


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    assert_one_line_error(run("--model", str(path), "hi"), "'gpt2'", "llama, qwen2, qwen3")


def test_unsupported_quant_type(tmp_path):
    path = write_gguf(tmp_path / "iq.gguf", tensor_type=gguf.GGMLQuantizationType.IQ4_NL)
    assert_one_line_error(run("--model", str(path), "hi"), "IQ4_NL", "Q4_K")


def test_corrupt_safetensors(tmp_path):
    directory = tiny_hf_dir(tmp_path / "m")
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert_one_line_error(run("--model", str(directory), "hi"), "model.safetensors")


def test_unsupported_hf_architecture(tmp_path):
    directory = tiny_hf_dir(tmp_path / "m", model_type="gpt2")
    assert_one_line_error(run("--model", str(directory), "hi"), "'gpt2'", "llama, mistral, qwen2, qwen3")


@pytest.mark.parametrize("args, needles", [
    (["--max-tokens", "-5", "hi"], ["max_tokens", "-5"]),
    (["--top-p", "0", "hi"], ["top_p"]),
    (["--temperature", "-1", "hi"], ["temperature"]),
    (["--dtype", "int3", "hi"], ["'int3'", "float32"]),
    (["--device", "gpu", "hi"], ["'gpu'", "cpu"]),
    (["--method", "full", "--compression", "0.5", "hi"], ["'full' does not compress"]),
    (["--method", "kivi", "--compression", "0.5", "hi"], ["'kivi' does not compress", "snapkv+kivi"]),
    (["--method", "h2o+kivi", "hi"], ["h2o evicts during decode", "snapkv"]),
    (["--method", "kivi", "--method-arg", "bits=3", "hi"], ["bits=3", "2, 4 or 8"]),
    (["   "], ["prompt is empty"]),
])
def test_bad_arguments(args, needles):
    assert_one_line_error(run(*args), *needles)


@pytest.mark.slow
def test_default_command_answers_paris(smollm2_gguf, tmp_path):
    stats = tmp_path / "stats.json"
    result = run("--stats-json", str(stats), "--max-tokens", "48")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    data = json.loads(stats.read_text())
    assert set(data) == {"model", "method", "device", "dtype", "prompt_tokens", "generated_tokens",
                         "prefill_tokens_per_s", "decode_tokens_per_s", "kv_cache_bytes", "kv_cache_bytes_uncompressed",
                         "kv_cache_bytes_theory", "kv_cache_tokens", "kv_bytes_read_per_decode_token", "decode_graphs",
                         "tensor_parallel_size"}
    # a CPU runs every decode step eagerly, and says why
    graphs = data["decode_graphs"]
    assert graphs["eager_steps"] >= data["generated_tokens"] - 1 > 0
    assert graphs | {"eager_steps": 0} == {"replayed_steps": 0, "eager_steps": 0, "graphs": 0, "capture_s": 0.0,
                                           "eager_reason": "CUDA graphs need a CUDA device"}
    # full reads every block it holds: each decode step a little more than the one before
    assert 0 < data["kv_bytes_read_per_decode_token"] <= data["kv_cache_bytes"]
    # full-precision cache in the dtype --dtype auto chose (float32 on a CPU without bfloat16
    # arithmetic), in 16-token head-blocks of 16 x (64 dims x 2 (K and V) x its bytes + a 4-byte
    # position), one list of blocks per (layer, kv-head) = 30 x 3, for the tokens that went through
    # the model (the last one sampled may not have)
    assert data["dtype"] in ("bfloat16", "float32")
    size = 2 if data["dtype"] == "bfloat16" else 4
    held = [30 * 3 * -(-n // 16) * 16 * (64 * 2 * size + 4) for n in
            (data["prompt_tokens"] + data["generated_tokens"] - 1, data["prompt_tokens"] + data["generated_tokens"])]
    assert data["kv_cache_bytes"] in held


@pytest.mark.slow
def test_kivi_stats_count_packed_blocks_and_the_residual(smollm2_gguf, tmp_path):
    stats = tmp_path / "stats.json"
    prompt = "Tell me about the history of Paris. " * 12
    result = run("--method", "kivi", "--method-arg", "bits=4", "--stats-json", str(stats), "--max-tokens", "24", prompt)
    assert result.returncode == 0, result.stderr
    data = json.loads(stats.read_text())
    n = data["kv_cache_tokens"]
    assert n > 128  # at least one quantized block per head
    # a 4-bit block of 128 tokens: codes 2 x 128 x 32 bytes + float16 scales and zeros (keys 4 x 64,
    # values 128 x 2, two each) = 10,240 bytes; the residual, in the dtype --dtype auto chose: blocks
    # of as many tokens as fit in rows of that size (bfloat16: 39 of 260 bytes each)
    residual = 64 * 2 * (2 if data["dtype"] == "bfloat16" else 4) + 4
    assert data["kv_cache_bytes"] == 30 * 3 * (n // 128 + -(-(n % 128) // (10240 // residual))) * 10240
    assert data["kv_cache_bytes_theory"] == 30 * 3 * (n // 128 * 10240 + n % 128 * residual)
    assert "B/token" in result.stderr


# --- device and dtype: refused before any model is looked for (the model named here does not exist) ---

def run_with(env: dict, *args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          env={**ENV, **env}, timeout=600, cwd=ROOT)


def test_float16_on_cpu_is_refused():
    assert_one_line_error(run("--model", "no-such-model", "--device", "cpu", "--dtype", "float16", "hi"),
                          "'float16' is not served on CPU", "float32")


def test_cuda_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_one_line_error(run("--model", "no-such-model", "--device", "cuda", "hi"), "'cuda' is not available",
                          "valid: cpu")


def test_an_unknown_cpu_isa_is_refused():
    assert_one_line_error(run_with({"NANOKV_CPU_ISA": "avx9"}, "--model", "no-such-model", "--device", "cpu", "hi"),
                          "NANOKV_CPU_ISA='avx9'", "native, avx2")


def test_auto_dtype_on_an_avx2_only_cpu_is_float32(tmp_path):
    from tiny_model import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    result = run_with({"NANOKV_CPU_ISA": "avx2"}, "--model", str(model), "--device", "cpu", "--dtype", "auto",
                      "--no-chat", "--max-tokens", "4", "--kv-cache-memory", str(16 << 20), "hi")
    assert result.returncode == 0, result.stderr
    [stats] = [line for line in result.stderr.splitlines() if line.startswith(f"[{model} | full |")]
    assert "| cpu float32]" in stats, stats
