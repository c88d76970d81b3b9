"""One decoder for Llama, Mistral, Qwen2 and Qwen3.

The four families differ by a few switches in ModelConfig: q/k/v biases (Qwen2), a
per-head RMSNorm on q and k before RoPE (Qwen3), a sliding window (Mistral), Llama-3 RoPE
scaling, tied embeddings. Everything else is the same pre-norm block:

    h = x + o_proj(attention(rope(q), rope(k), v))      q, k, v = qkv_proj(rms_norm(x))
    y = h + down_proj(silu(gate_proj(n)) * up_proj(n))   n = rms_norm(h)

The model never sees the KV cache. Each attention layer hands its fresh q, k, v to an
`attention` callable owned by the engine, which stores k and v wherever (and however
compressed) it likes and returns the attention output. Tokens of a batch are flattened
into one dimension [T] (varlen, as in vLLM), with one position per token.

Tensor parallelism (nanokv/distributed.py, nanokv/models/parallel.py): built from the config one
rank sees (its num_heads / tp heads, num_kv_heads / tp kv-heads, intermediate_size / tp), qkv_proj
and gate_up_proj hold this rank's rows (column-parallel) and o_proj and down_proj its columns
(row-parallel), whose partial sums one all-reduce per sub-block adds up: two per decoder block. The
embedding and the output head stay whole on every rank. At tp=1 the all-reduce is the identity.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanokv.kernels import cpu
from nanokv.models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from nanokv.config import ModelConfig
from nanokv.distributed import SINGLE, TensorParallel


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 sliding_window: int | None) -> torch.Tensor:
        """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim]."""

    def narrow(self, layer: int) -> torch.Tensor | None:
        """After `layer`: the rows of the step's tokens that go on to the next layer (None: all; an
        empty index ends the pass), or [R, 2] pairs of rows each going on as their mean, at the
        first one's position. An attention callable without it keeps every token."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.serves(x, self.weight):  # the same in one C++ pass
            return cpu.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 and cast back before the weight, exactly as transformers
        # does, so bfloat16 runs round the same way.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer = layer
        self.cfg, self.tp = cfg, tp
        self.sliding_window = cfg.sliding_windows[layer]
        # q, k and v in one matmul: one weight read instead of three.
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attention: Attention):
        cfg = self.cfg
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(self.layer, q, k, v, self.sliding_window)
        return self.tp.all_reduce(self.o_proj(out.reshape(-1, cfg.q_size)))  # row-parallel: sum the ranks' heads


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.intermediate_size, self.tp = cfg.intermediate_size, tp
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))  # row-parallel: sum the ranks' slices


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, cos, sin, attention: Attention):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's with the leading `model.` dropped and q/k/v
    and gate/up packed (see `load_weights`). `cfg`: the config one rank sees (TensorParallel.shard_config),
    the whole model's at tp=1; `load_weights` takes that rank's slices (models/parallel.py)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        # A plain float32 tensor, not a buffer: `model.to(bfloat16)` must not round the
        # rotation speeds (transformers keeps them in float32 too).
        self.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def tie_weights(self):
        """Share the embedding matrix with the output head when the checkpoint says so
        (again after `to_empty`, which allocates each parameter separately)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size] (logits are separate,
        so the engine can compute them only for the tokens it samples from)."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        narrow = getattr(attention, "narrow", None)  # a prefill may drop tokens between layers (FastKV)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attention)
            rows = narrow(i) if narrow is not None else None
            if rows is not None:
                if len(rows) == 0:  # the pass ends here (GemFilter's filter pass)
                    break
                if rows.dim() == 2:  # pairs of rows [R, 2] that go on as their mean (HOMER's merged copies)
                    x = (x[rows[:, 0]] + x[rows[:, 1]]) / 2  # a row paired with itself goes on unchanged
                    rows = rows[:, 0]  # a pair shares its position
                else:
                    x = x[rows]
                cos, sin = cos[rows], sin[rows]
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # Hugging Face name suffix -> (our packed parameter, which shard of it).
    PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @torch.no_grad()
    def load_weights(self, tensors):
        """Copy (name, tensor) pairs in Hugging Face naming into the model. Every parameter
        must be filled exactly once; anything missing or unexpected is an error."""
        params = dict(self.named_parameters())
        filled = set()
        for name, tensor in tensors:
            name = name.removeprefix("model.")
            if self.cfg.tie_word_embeddings and name == "lm_head.weight":
                continue  # some tied checkpoints still carry a copy
            target, shard, module = name, None, name.rsplit(".", 2)
            if len(module) == 3 and module[1] in self.PACKED:
                packed, shard = self.PACKED[module[1]]
                target = f"{module[0]}.{packed}.{module[2]}"
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} for architecture {self.cfg.architecture!r}")
            param = params[target]
            if shard is not None:
                param = param.narrow(0, *self.shard_range(target, shard))
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.copy_(tensor)
            filled.add((target, shard))
        expected = set()
        for target in params:
            suffix = target.rsplit(".", 2)[-2]
            shards = {"qkv_proj": 3, "gate_up_proj": 2}.get(suffix)
            expected |= {(target, s) for s in range(shards)} if shards else {(target, None)}
        missing = sorted(t if s is None else f"{t}[{s}]" for t, s in expected - filled)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def shard_range(self, target: str, shard: int) -> tuple[int, int]:
        """(first row, rows) of shard `shard` (q, k, v; or gate, up) in the packed parameter `target`."""
        cfg = self.cfg
        if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias"):
            sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        else:
            sizes = [cfg.intermediate_size] * 2
        return sum(sizes[:shard]), sizes[shard]
