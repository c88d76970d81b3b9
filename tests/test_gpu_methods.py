"""Every registered method, and the eviction+quantization combinations, end to end on CUDA.

The first GPU run found 14 of 19 method settings crashing in their first prefill (a block table
left on the host met the pool on the GPU), while the CPU suite passed: nothing there can tell a
host tensor from a device one. So each method runs here on tiny random Llama and Qwen2 models
(float32; prompts of 7, 64, 300 and 1,100 tokens, batched) three ways:

- on CUDA with the Triton kernels and with the plain-torch ones (`kernels="reference"`): the
  same greedy tokens;
- on the CPU with the plain-torch kernels: the same KV bytes held as on CUDA, request by request
  (compression frees the same blocks whatever the device).

`full` is also checked against transformers on the same GPU. Every case is marked `gpu`
(`make test-gpu` runs them alone) and skipped where CUDA is not available.
"""

import pytest
import torch

from helpers import byte_tokenizer_json
from nanokv.methods import METHODS, make_method
from nanokv.methods.registry import QUANTIZERS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT_LENGTHS = (7, 64, 300, 1100)
STEPS = 8
# the artifact each calibrated method reads (lserve reads duoattention's)
CALIBRATED = {name: m.calibration for name, m in METHODS.items() if m.calibration}


def knob(name: str) -> dict:
    """How much each setting compresses: half the prompt, quest a 64-token read budget, an offloader
    256 (its device window and sinks take part), a sparse prefill 64 keys per query row or segment,
    a quantizer alone nothing more than its bits, cacheblend its own recompute ratio."""
    first = name.split("+")[0]
    if first == "full" or first in QUANTIZERS or METHODS[first].blends:
        return {}
    if METHODS[first].offloads:
        return {"budget": 256}
    if METHODS[first].selects_pages or METHODS[first].sparse_prefill:
        return {"budget": 64}
    return {"compression": 0.5}


def valid(name: str) -> bool:
    try:
        make_method(name, **knob(name))
        return True
    except ValueError:
        return False


# every method alone; every quantizer after snapkv; every eviction method that can take one before kivi
SETTINGS = list(METHODS) + sorted({f"snapkv+{q}" for q in QUANTIZERS} |
                                  {f"{m}+kivi" for m in METHODS if valid(f"{m}+kivi")})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (path, calibration files)}: tiny random Llama and Qwen2 (4 layers, 4 query heads over
    2 kv-heads of 64, a byte-level tokenizer), saved with save_pretrained, with a profile for every
    calibrated method."""
    import transformers as T

    shapes = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.2)
    made = {}
    for arch, config in (("llama", T.LlamaConfig(**shapes)), ("qwen2", T.Qwen2Config(**shapes))):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch)
        T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
        (path / "tokenizer.json").write_text(byte_tokenizer_json())
        made[arch] = (path, calibrations(path, tmp_path_factory.mktemp(f"{arch}-calibration")))
    return made


def calibrations(path, folder) -> dict:
    """A profile of each calibrated method for the model at `path`: random head scores
    (duoattention, headkv), two shared layer pairs (kvsharer), the weights' bases (lorc), the
    whitened bases with Fisher weights over two short texts (palu), the activations' bases over
    them (eckvh), and over them too the codebooks (kvquant) and the channel clusters and clip
    ratios (skvq), the keys' principal directions (loki), the channel magnitudes (double_sparsity),
    the centroid thresholds (squeezed_attention) and each query head's pattern (minference)."""
    from nanokv.calibrate import model_key, write_artifact
    from nanokv.calibrate.eckvh import activation_bases
    from nanokv.calibrate.lowrank import default_group, fisher_information, weight_bases, whitened_bases
    from nanokv.calibrate.kvquant import kvquant_codebooks
    from nanokv.calibrate.skvq import skvq_calibration
    from nanokv.calibrate.loki import loki_bases
    from nanokv.calibrate.double_sparsity import channel_magnitudes
    from nanokv.calibrate.squeezed_attention import squeezed_thresholds
    from nanokv.loading import load_model

    model, cfg = load_model("hf_dir", path, torch.float32, pack=False)
    L, H = cfg.num_layers, cfg.num_kv_heads
    common = {"format": 1, "model": model_key(str(path)), "num_layers": L, "num_kv_heads": H, "settings": {}}
    gen = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 256, (96,), generator=gen).tolist() for _ in range(2)]
    group = default_group(H)
    artifacts = {
        "duoattention": {"head_scores": torch.rand(L, H, generator=gen).tolist()},
        "headkv": {"head_scores": torch.rand(L, H, generator=gen).tolist()},
        "retrieval_head": {"head_scores": (0.2 * torch.rand(L, H, generator=gen)).tolist()},   # some above 0.1
        "razorattention": {"head_scores": torch.rand(L, H, generator=gen).tolist(),
                           "echo_scores": torch.rand(L, H, generator=gen).tolist()},
        "kvsharer": {"pairs": [[1, 0], [3, 2]]},
        "kvtuner": {"pairs": [[8, 8], [8, 4], [4, 4], [4, 2], [2, 2]],       # errors growing as bits fall
                    "layer_errors": (torch.rand(L, 1, generator=gen) * torch.tensor([1, 2, 4, 8, 16])).tolist()},
        "wkvquant": {"head_dim": cfg.head_dim, **{f"{kind}_{stat}": torch.rand(L, cfg.head_dim, generator=gen).tolist()
                                                  for kind in "kv" for stat in ("center", "radius")},
                     "search": {bits: {f"{kind}_{p}": [0.5 if p == "alpha" else 0.9] * L for kind in "kv"
                                       for p in ("alpha", "clip")} for bits in ("2", "4", "8")}},
        "lorc": {"group": H, "head_dim": cfg.head_dim, "tensors": weight_bases(model, cfg, H)},
        "palu": {"group": group, "head_dim": cfg.head_dim,
                 "tensors": {**whitened_bases(model, cfg, texts, group), **fisher_information(model, cfg, texts)}},
        "eckvh": {"group": group, "head_dim": cfg.head_dim, "tensors": activation_bases(model, cfg, texts, group)},
        # codebooks from blocks of 32 tokens (the texts are shorter than the codec's 128)
        "kvquant": {"head_dim": cfg.head_dim, "tensors": kvquant_codebooks(model, cfg, texts, block_size=32)},
        "skvq": {"head_dim": cfg.head_dim, "tensors": skvq_calibration(model, cfg, texts)},
        "loki": {"head_dim": cfg.head_dim, "tensors": loki_bases(model, cfg, texts)},
        "double_sparsity": {"head_dim": cfg.head_dim, "tensors": channel_magnitudes(model, cfg, texts)},
        "squeezed_attention": dict(zip(("thresholds", "layer_thresholds"),
                                       squeezed_thresholds(model, cfg, texts, clusters=0.05, window=16))),
        # each query head's pattern: 0 A-shape, 1 Vertical-Slash, 2 Block-Sparse, every one present
        "minference": {"patterns": [[(layer + head) % 3 for head in range(cfg.num_heads)] for layer in range(L)]},
    }
    files = {}
    for method, fields in artifacts.items():
        files[method] = folder / (f"{method}.safetensors" if "tensors" in fields else f"{method}.json")
        write_artifact(files[method], {**common, "method": method, **fields})
    return files


def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def run(path, files, name, device, kernels):
    """Greedy tokens and KV bytes held of every prompt, batched through one engine."""
    from nanokv import LLM, SamplingParams

    calibrated = [part for part in name.split("+") if part in CALIBRATED]  # an evictor's, or a quantizer's
    extra = {"calibration_file": str(files[CALIBRATED[calibrated[0]]])} if calibrated else {}
    llm = LLM(str(path), dtype="float32", device=device, method=name, kernels=kernels,
              kv_cache_memory=256 << 20, **knob(name), **extra)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=STEPS, ignore_eos=True))
    return [o.token_ids for o in outs], [o.metrics["kv_cache_bytes"] for o in outs]


@pytest.mark.parametrize("name", SETTINGS)
def test_method_runs_on_cuda(models, name):
    for arch, (path, files) in models.items():
        triton_tokens, triton_bytes = run(path, files, name, "cuda", "triton")
        reference_tokens, reference_bytes = run(path, files, name, "cuda", "reference")
        _, cpu_bytes = run(path, files, name, "cpu", "reference")
        assert triton_tokens == reference_tokens, f"{arch}: Triton and plain-torch kernels disagree on CUDA"
        assert triton_bytes == reference_bytes == cpu_bytes, f"{arch}: KV bytes held differ between devices"


def test_full_equals_transformers_on_cuda(models):
    import transformers as T

    from helpers import assert_same_greedy, hf_greedy

    for arch, (path, files) in models.items():
        hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
        ours, _ = run(path, files, "full", "cuda", "triton")
        for ids, tokens in zip(prompts(), ours):
            theirs, logits = hf_greedy(hf, ids, STEPS)
            assert_same_greedy(tokens, theirs, logits)
