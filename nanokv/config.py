"""ModelConfig: the handful of numbers that shape a Llama-family decoder.

Two sources fill it: a Hugging Face `config.json` (both the transformers 4.x spelling,
`rope_theta` + `rope_scaling`, and the 5.x one, `rope_parameters`) and GGUF metadata
(`{arch}.block_count`, ...). Everything downstream reads only this dataclass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type / GGUF architecture -> the family switches of nanokv/models/llama.py.
# Mistral GGUFs are written with architecture "llama", so no "mistral" GGUF key is needed.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# "freq_factors": per-frequency divisors stored as a tensor (llama.cpp's rope_freqs for Llama 3.1+).
ROPE_TYPES = ("default", "llama3", "linear", "freq_factors")


class ConfigError(ValueError):
    """A config that nanokv cannot run; the message names the bad value and the choices."""


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # Qwen2: biases on q/k/v projections
    qk_norm: bool = False               # Qwen3: RMSNorm on q and k per head, before RoPE
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": ...}
    # Per-layer sliding window (None = full attention). Mistral slides every layer; Qwen2/3
    # name sliding layers in `layer_types`.
    sliding_windows: list = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    initializer_range: float = 0.02     # std of random weights (--load-format dummy), as transformers inits

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {self.architecture!r}; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; "
                              f"supported: {', '.join(ROPE_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        arch = cfg.get("model_type")
        if arch is None:  # very old configs only name the class
            arch = (cfg.get("architectures") or ["?"])[0].replace("ForCausalLM", "").lower()
        if arch not in ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {arch!r} in config.json; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:  # transformers 4.3x spelling
            rope["rope_type"] = rope.pop("type")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=arch == "qwen3",
            rope_scaling=rope,
            sliding_windows=_hf_sliding_windows(cfg, arch, n_layers),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            initializer_range=cfg.get("initializer_range") or 0.02,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        return cls.from_json_file(Path(path) / "config.json")

    @classmethod
    def from_json_file(cls, file: str | Path) -> "ModelConfig":
        """A Hugging Face config.json on its own (nanokv ships some: nanokv/models/configs/)."""
        file = Path(file)
        try:
            cfg = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {file}: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{file} is not a JSON object")
        try:
            return cls.from_hf_dict(cfg)
        except KeyError as e:
            raise ConfigError(f"{file} lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensor_names: set[str]) -> "ModelConfig":
        """`meta` maps GGUF keys to plain Python values (see nanokv.loading)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3"):
            raise ConfigError(f"unsupported GGUF architecture {arch!r}; "
                              f"supported: llama, qwen2, qwen3")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_heads = get("attention.head_count")
        n_kv = meta.get(f"{arch}.attention.head_count_kv") or n_heads
        hidden = get("embedding_length")
        n_layers = get("block_count")
        window = meta.get(f"{arch}.attention.sliding_window")
        rope = {}
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            rope = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
        elif scaling_type not in (None, "none"):
            raise ConfigError(f"unsupported GGUF rope scaling {scaling_type!r}; supported: linear")
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=meta.get(f"{arch}.attention.key_length") or hidden // n_heads,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=get("context_length"),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            rope_scaling=rope,
            sliding_windows=[window] * n_layers if window else [],
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )


def _hf_sliding_windows(cfg: dict, arch: str, n_layers: int) -> list:
    window = cfg.get("sliding_window")
    if not window:
        return [None] * n_layers
    if arch == "mistral":
        return [window] * n_layers
    # Qwen2/Qwen3: sliding only when enabled, and only on layers named "sliding_attention"
    # (transformers 5 writes layer_types; older configs use max_window_layers).
    if not cfg.get("use_sliding_window", False):
        return [None] * n_layers
    types = cfg.get("layer_types")
    if types is None:
        first_full = cfg.get("max_window_layers", n_layers)
        types = ["sliding_attention" if i >= first_full else "full_attention" for i in range(n_layers)]
    return [window if t == "sliding_attention" else None for t in types]
