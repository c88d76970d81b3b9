"""kvtuner: KIVI quantization with a key/value bit pair per layer, searched offline for a memory target.

Paper: KVTuner: Sensitivity-Aware Layer-wise Mixed Precision KV Cache Quantization for Efficient
and Nearly Lossless LLM Inference (Li et al., ICML 2025), arXiv 2502.04420. Layers differ in how
much quantizing their KV hurts, and keys matter more than values, so each layer gets its own pair
(K bits, V bits) from a short list, chosen offline on calibration data under a memory target:
1. sensitivity: `python -m nanokv.calibrate kvtuner` runs calibration text through the model and,
   for every layer and every candidate pair, quantizes that layer's keys and values alone (KIVI:
   keys per channel over groups of tokens, values per token) and measures the relative error of its
   attention output, ||O_q - O||^2 / ||O||^2 over all queries (nanokv/calibrate/kvtuner.py);
2. intra-layer pruning: the candidates are the official code's already pruned list, K8V8, K8V4,
   K4V4, K4V2, K2V2 (never fewer key bits than value bits);
3. inter-layer clustering: layers are clustered by sensitivity (1-d k-means on the mean log error
   over the candidates, `clusters` groups), every layer of a cluster takes one pair;
4. search: every assignment of a pair to each cluster (5^clusters) is scored by its average bits
   per K/V number (memory) and the sum of its layers' errors (quality); of the Pareto front the
   assignment with the least error whose average bits are at most `target` wins (ties: fewer bits).
The codes are KIVI's: each layer's cold blocks hold codes of its own bits.

Defaults from the official code (cmd2001/KVTuner; the search scripts as read in the fork
KexuanZhang/KVTuner @ 519db0f, optuna_search.py: TEMPLATE_KV_QUANT_CONFIG, three layer groups
"important / medium / other", residual_length=32, group_size=32, keys per channel, values per
token; calibration_presets/*_KVTuner4_*.yaml: a target of 4 bits on average). Calibration: 8
samples of 1,024 tokens of the prose haystack (nanokv's choice, to stay cheap on a CPU).

What differs:
- The quality objective: the official search runs NSGA-II (optuna) with GSM8K few-shot accuracy
  of the whole quantized model per trial; here each layer's relative attention-output error on
  calibration text, summed over layers (so a configuration costs no model run), and the search is
  exhaustive over the clusters' pairs (125 assignments for 3 clusters) instead of sampled.
- Clusters come from the calibration (k-means over the layers' sensitivity); the official script
  hard-codes its groups per model family from an earlier sensitivity analysis.
- The search runs when the engine binds the artifact (it takes milliseconds), so one calibration
  serves every `target`; the artifact holds the sensitivities.
- Every cold block is laid out for the largest pair (pool rows are one size, field_shapes gives the
  largest layout); a layer's block uses the code bytes of its own bits, and the bytes reported
  (`quantized_bytes`, kv_cache_bytes_theory) are those. Pool rows of low-bit layers leave the rest
  of the row unused.
- Scales and zero points are float16 (as nanokv's KIVI); values are flushed with their keys,
  R = residual_length at a time (see kivi.py).
- The fused decode kernels (Triton on CUDA, C++ on CPU) read each layer's codes in place at its
  own pair, from the front of rows sized for the widest.
"""

from __future__ import annotations

import itertools

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import dequantize_tokens, pack, quantize
from nanokv.methods.base import CALIBRATION_FILE, Method
from nanokv.methods.kivi import check_grouped_residual, grouped_residual

PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))  # (K bits, V bits): the official candidate list
SCALE_DTYPE = torch.float16


class KVTunerCodec(Codec):
    """KIVI's layout with (K bits, V bits) per layer: keys per channel over groups of `group_size`
    tokens, values per token over groups of `group_size` channels, codes packed along the head dim."""

    packed = True            # KIVI's codes at a width per layer: the fused kernels read them
    keys_per_channel = True

    def __init__(self, pairs: list[tuple[int, int]], group_size: int = 32, block_size: int = 32):
        self.pairs, self.group_size, self.block_size = [tuple(p) for p in pairs], group_size, block_size
        self.k_max, self.v_max = max(k for k, _ in self.pairs), max(v for _, v in self.pairs)

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if head_dim % self.group_size:
            raise ValueError(f"head_dim={head_dim} is not a multiple of group_size={self.group_size}")
        R, G, D = self.block_size, self.group_size, head_dim
        per_channel, per_token = (SCALE_DTYPE, (R // G, D)), (SCALE_DTYPE, (R, D // G))
        return {"k_codes": (torch.uint8, (R, D * self.k_max // 8)), "v_codes": (torch.uint8, (R, D * self.v_max // 8)),
                "k_scale": per_channel, "k_zero": per_channel, "v_scale": per_token, "v_zero": per_token}

    def packed_bits(self, layer):
        return self.pairs[layer]

    def quantized_bytes(self, head_dim: int, layer: int | None = None) -> int:
        if layer is None:
            return super().quantized_bytes(head_dim)
        k_bits, v_bits = self.pairs[layer]
        R, G, D = self.block_size, self.group_size, head_dim
        scales = SCALE_DTYPE.itemsize * 2 * (R // G * D + R * D // G)
        return R * D * (k_bits + v_bits) // 8 + scales

    def encode(self, k, v, layer, importance):
        k_bits, v_bits = self.pairs[layer]
        G, D = self.group_size, k.shape[-1]
        k_codes, k_scale, k_zero = quantize(k, k_bits, G, dim=-2, scale_dtype=SCALE_DTYPE)
        v_codes, v_scale, v_zero = quantize(v, v_bits, G, dim=-1, scale_dtype=SCALE_DTYPE)
        # a low-bit layer fills the front of the code field; the rest of the row is not its bytes
        pad = lambda codes, bits, most: torch.nn.functional.pad(pack(codes, bits), (0, D * (most - bits) // 8))  # noqa: E731
        return {"k_codes": pad(k_codes, k_bits, self.k_max), "v_codes": pad(v_codes, v_bits, self.v_max),
                "k_scale": k_scale.squeeze(-2), "k_zero": k_zero.squeeze(-2),
                "v_scale": v_scale.squeeze(-1), "v_zero": v_zero.squeeze(-1)}

    def decode(self, fields, layer):
        k_bits, v_bits = self.pairs[layer]
        f, G = fields, self.group_size
        D = f["k_scale"].shape[-1]
        keys = dequantize_tokens(f["k_codes"][..., :D * k_bits // 8], f["k_scale"], f["k_zero"], k_bits, G, True)
        values = dequantize_tokens(f["v_codes"][..., :D * v_bits // 8], f["v_scale"], f["v_zero"], v_bits, G, False)
        return keys, values


def cluster_layers(errors: torch.Tensor, clusters: int) -> list[int]:
    """errors [L, P] (each layer's relative attention error under each candidate pair) -> each
    layer's cluster, 0 the most sensitive: 1-d k-means on the mean log error, centres started at
    evenly spaced quantiles, 100 rounds at most."""
    s = errors.double().clamp_min(1e-12).log().mean(1)
    k = min(clusters, len(set(s.tolist())))
    order = s.sort().values
    centres = order[torch.linspace(0, len(s) - 1, k, device=s.device).round().long()].clone()
    for _ in range(100):
        labels = (s[:, None] - centres[None]).abs().argmin(1)
        moved = torch.stack([s[labels == c].mean() if bool((labels == c).any()) else centres[c] for c in range(k)])
        if torch.equal(moved, centres):
            break
        centres = moved
    rank = torch.argsort(centres, descending=True).argsort()  # cluster id by sensitivity, highest first
    return rank[labels].tolist()


def search_pairs(errors: torch.Tensor, labels: list[int], target: float) -> list[int]:
    """The candidate index of each layer: every assignment of a pair to each cluster, of those whose
    average bits per K/V number is at most `target`, the least summed error (then the fewest bits)."""
    L, C = len(labels), max(labels) + 1
    best = None
    for choice in itertools.product(range(len(PAIRS)), repeat=C):
        per_layer = [choice[c] for c in labels]
        bits = sum(sum(PAIRS[p]) for p in per_layer) / (2 * L)
        if bits > target + 1e-9:
            continue
        error = float(sum(errors[layer, p] for layer, p in enumerate(per_layer)))
        if best is None or (error, bits) < best[:2]:
            best = (error, bits, per_layer)
    return best[2]


class KVTuner(Method):
    name = "kvtuner"
    description = "KIVI with a (K bits, V bits) pair per layer, searched offline on calibration text for a memory target"
    paper = "https://arxiv.org/abs/2502.04420"
    calibration = "kvtuner"
    keys_per_channel = True
    quantizes = True
    compression_hint = "it keeps every token, in fewer bits; to evict too, combine methods, e.g. snapkv+kvtuner"
    options = {
        "target": (float, 4.0, "the average bits per K/V number, in [2, 8]", lambda v: 2 <= v <= 8),
        "clusters": (int, 3, "the number of layer groups, 1 to 6", lambda v: 1 <= v <= 6),
        **grouped_residual(group_size=32, residual_length=32),
        "calibration_file": CALIBRATION_FILE,
    }
    bit_pairs: list[tuple[int, int]] | None = None  # per layer, once the calibration is bound

    def check_budget(self):
        check_grouped_residual(self)

    def bind_calibration(self, artifact: dict):
        if [tuple(p) for p in artifact["pairs"]] != list(PAIRS):
            raise ValueError(f"kvtuner calibration holds candidates {artifact['pairs']}, expected {list(PAIRS)}; "
                             f"make it again with python -m nanokv.calibrate kvtuner")
        errors = torch.tensor(artifact["layer_errors"], dtype=torch.float64, device="cpu")
        self.layer_clusters = cluster_layers(errors, self.clusters)
        self.bit_pairs = [PAIRS[p] for p in search_pairs(errors, self.layer_clusters, self.target)]

    @property
    def quantization(self) -> KVTunerCodec:
        if self.bit_pairs is None:
            raise ValueError("method kvtuner has no bit pairs yet: it needs its calibration "
                             "(python -m nanokv.calibrate kvtuner --model ...), bound when LLM loads the model")
        return KVTunerCodec(self.bit_pairs, self.group_size, self.residual_length)
