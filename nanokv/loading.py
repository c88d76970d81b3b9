"""Weights from disk: Hugging Face directories (config.json + safetensors, sharded or not)
and GGUF files (dequantized with the `gguf` package). Both end as (ModelConfig, a stream
of (Hugging Face name, tensor) pairs) that `LlamaModel.load_weights` consumes.

Or no weights at all: `dummy_model` fills a model of a given shape with seeded random numbers
(vLLM's `--load-format dummy`), to run and time an architecture without downloading it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from nanokv.models import MODEL_CLASSES
from nanokv.models.llama import RMSNorm
from nanokv.kernels.cpu import gemv_available
from nanokv.models.cpu_linear import can_pack, pack_linears
from nanokv.models.parallel import shard_weights
from nanokv.config import ConfigError, ModelConfig
from nanokv.distributed import SINGLE, TensorParallel
from nanokv.gguf_file import GGUFError, GGUFFile, dequantize

# The GGUF tensor types we dequantize. The list plus the K-quant siblings that
# gguf.quants implements with the same code path; anything else is refused up front.
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
              "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# "auto": real weights from a checkpoint or GGUF; "dummy": random weights of a shipped shape
LOAD_FORMATS = ("auto", "dummy")


class ModelLoadError(ValueError):
    """A weights file nanokv cannot use; the message names the file and what is wrong."""


def read_config(kind: str, path: str | Path) -> ModelConfig:
    """The model's configuration ("hf_dir" or "gguf"), without reading its weights."""
    if kind == "gguf":
        return _gguf_config(Path(path))
    if kind == "hf_dir":
        return ModelConfig.from_hf_dir(path)
    raise ValueError(f"unknown model kind {kind!r}; valid: hf_dir, gguf")


def load_model(kind: str, path: str | Path, dtype: torch.dtype, device="cpu", pack: bool = True,
               tp: TensorParallel = SINGLE):
    """Build the model for `path` ("hf_dir" or "gguf") and fill its weights -> (model, config).
    On CPU in bfloat16 the linear layers' weights are then packed for oneDNN (nanokv/models/cpu_linear.py)
    unless `pack` is False. Under tensor parallelism `tp` the model holds this rank's heads and
    slices (model.cfg); the config returned is the whole model's."""
    path = Path(path)
    config = read_config(kind, path)
    tensors = gguf_tensors(path, config) if kind == "gguf" else _safetensors_tensors(path)
    tensors = shard_weights(tensors, tp.rank, tp.size)
    model = empty_model(config, dtype, device, tp)
    try:
        model.load_weights(tensors)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if pack:
        pack_for_cpu(model, dtype, device)
    return model.eval(), config


def empty_model(config: ModelConfig, dtype: torch.dtype, device="cpu", tp: TensorParallel = SINGLE):
    """The model for `config` (the whole model's) with its weights allocated on `device` but not yet
    set: under tensor parallelism `tp`, one rank's share of them (tp.shard_config)."""
    # Build on the meta device (no random init of weights about to be overwritten), then
    # allocate for real. inv_freq is a plain float32 attribute, untouched by the dtype cast.
    # (cast on meta, so no float32 copy of the weights is ever allocated on the device)
    with torch.device("meta"):
        model = MODEL_CLASSES[config.architecture](tp.shard_config(config), tp).to(dtype)
    model = model.to_empty(device=device)
    model.inv_freq = model.inv_freq.to(device)
    model.tie_weights()
    return model


def pack_for_cpu(model, dtype: torch.dtype, device) -> None:
    """Pack the linear layers for oneDNN where it serves this dtype (bfloat16 on a capable CPU)."""
    if can_pack(dtype, device):
        # a second, row-major copy of the weights for the batch-1 matmuls (nanokv/models/cpu_linear.py),
        # where it costs at most a quarter of the memory left
        weight_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
        pack_linears(model, keep_rows=gemv_available() and 4 * weight_bytes <= available_memory(device))


# --- random weights (--load-format dummy) -------------------------------------------------

def load_dummy(name: str, dtype: torch.dtype, device="cpu", seed: int = 0, pack: bool = True,
               tp: TensorParallel = SINGLE):
    """Random weights in the shape of `name` (a shipped short name or a config.json path) -> (model, config)."""
    from nanokv.hub import config_file

    config = ModelConfig.from_json_file(config_file(name))
    return dummy_model(config, dtype, device, seed, pack, tp), config


@torch.no_grad()
def dummy_model(config: ModelConfig, dtype: torch.dtype, device="cpu", seed: int = 0, pack: bool = True,
                tp: TensorParallel = SINGLE):
    """A model of `config`'s shape with random weights, initialised as transformers' `_init_weights`
    does for Llama: linear and embedding weights normal(0, initializer_range), biases 0, norms 1.

    The numbers are drawn on `device` from a generator seeded with `seed`, parameter by parameter in
    the model's fixed order, so one seed gives one set of weights on a device type (CPU and CUDA
    draw different streams; drawing an 8B model on the CPU to copy it over would take minutes).
    Under tensor parallelism each rank draws the whole model and keeps its slices, so its weights
    are those of tp=1 (the whole model passes through each rank's memory once)."""
    if tp.size > 1:
        whole = dummy_model(config, dtype, device, seed, pack=False)
        model = empty_model(config, dtype, device, tp)
        model.load_weights(shard_weights(hf_tensors(whole), tp.rank, tp.size))
        del whole
        if pack:
            pack_for_cpu(model, dtype, device)
        return model.eval()
    model = empty_model(config, dtype, device)
    generator = torch.Generator(device).manual_seed(seed)
    done = set()  # a tied output head shares the embedding matrix: draw it once
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and id(module.weight) not in done:
            module.weight.normal_(0.0, config.initializer_range, generator=generator)
            done.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    if pack:
        pack_for_cpu(model, dtype, device)
    return model.eval()


def hf_tensors(model):
    """(Hugging Face name, tensor) for every weight of an unpacked nanokv model (pack=False): the
    reverse of `LlamaModel.load_weights`, q/k/v and gate/up cut back apart (views, no copies)."""
    split = {}  # our packed layer -> its Hugging Face layers, in shard order
    for hf, (packed, shard) in sorted(model.PACKED.items(), key=lambda item: item[1]):
        split.setdefault(packed, []).append(hf)
    for name, tensor in model.named_parameters():  # a tied output head is listed once, as the embedding
        *parent, layer, kind = name.split(".")  # layers.3.self_attn . qkv_proj . weight
        if layer in split:
            for shard, hf in enumerate(split[layer]):
                yield f"model.{'.'.join(parent)}.{hf}.{kind}", tensor.narrow(0, *model.shard_range(name, shard))
        else:
            yield name if name.startswith("lm_head.") else f"model.{name}", tensor


def available_memory(device) -> int:
    """Bytes free on `device` now: free GPU memory, or the kernel's MemAvailable on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


# --- safetensors -----------------------------------------------------------------------

def _safetensors_tensors(directory: Path):
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the shards (and skips e.g. consolidated.safetensors)
        try:
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: unreadable shard index ({e})") from None
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors files (pytorch .bin checkpoints are not supported)")
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from None


# --- GGUF ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def read_gguf(path: str | Path) -> GGUFFile:
    """Open and parse a GGUF file once: the tokenizer and the weights both read it."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except Exception as e:  # a corrupt header can fail anywhere in the parse
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def _gguf_config(path: Path) -> ModelConfig:
    file = read_gguf(path)
    tensors = {t.name: t for t in file.tensors}
    try:
        config = ModelConfig.from_gguf_metadata(file.metadata, set(tensors))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for t in file.tensors:
        if t.type_name not in GGUF_TYPES:
            raise ModelLoadError(f"{path}: tensor {t.name} has unsupported type {t.type_name}; "
                                 f"supported: {', '.join(GGUF_TYPES)}")
    if "rope_freqs.weight" in tensors:
        factors = dequantize(tensors["rope_freqs.weight"]).tolist()
        config.rope_scaling = {"rope_type": "freq_factors", "factors": factors}
    return config


def gguf_tensors(path: Path, config: ModelConfig):
    """(HF name, tensor) pairs of the GGUF at `path`, dequantized: what load_weights takes."""
    file = read_gguf(path)
    # llama.cpp's converter reorders Q/K rows of Llama-architecture models for its own
    # rotary layout (pairs (i, i+1) instead of (i, i + d/2)); Qwen GGUFs are written as-is.
    permuted = file.metadata["general.architecture"] == "llama"
    for t in file.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = _hf_name(t.name)
        if name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name}")
        tensor = torch.from_numpy(np.array(dequantize(t)))  # a copy: F32 data is a read-only memmap
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute_rows(tensor, config.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute_rows(tensor, config.num_kv_heads)
        yield name, tensor


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, rows were split into (d/2, 2) interleaved
    pairs; put them back as two halves (2, d/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

