"""What storage a method asks for (`CacheRequest`, from Method.cache_request), and the cache that
holds it (`build_cache`): the one place that picks a block kind."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanokv.cache.host_tier import OffloadedKVCache
from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.latent_cache import LatentKVCache
from nanokv.cache.paired import PairedKVCache
from nanokv.cache.pruned_cache import PrunedKVCache
from nanokv.cache.quant_cache import QuantizedKVCache
from nanokv.cache.quant_pool import QuantSpec


@dataclass
class HostTier:
    """Older tokens in host memory (an Offloader: shadowkv, arkvale): what stays on the device."""
    device_window: int                         # the newest tokens of each head kept there
    skip_layers: int = 0                       # layers kept whole there
    summary_fields: dict = field(default_factory=dict)  # {name: (dtype, shape)} per host slot, on the device
    summary_bounds: bool = False               # each host block's key bounds, on the device


@dataclass
class CacheRequest:
    quantization: QuantSpec | None = None      # quantized blocks behind a full-precision residual (kivi)
    latent_layers: list | None = None          # tokens as low-rank latents, per layer (lorc, palu)
    group: int = 1                             # kv-heads sharing one latent basis
    key_channels: int | None = None            # older keys keep this many channels (think)
    pairs: list[tuple[int, int]] | None = None  # layers whose prompt is stored once (minicache)
    sources: list[int] | None = None           # the layer whose KV each layer reads (kvsharer)
    slot_fields: dict[str, torch.dtype] = field(default_factory=dict)  # per-token state (h2o's scores)
    key_bounds: bool = False                   # each block's smallest and largest keys (quest)
    host_tier: HostTier | None = None          # older tokens offloaded to host memory

    def table_tiers(self) -> int:
        """How many mirrors of its tables (DeviceTables) the cache build_cache makes for this request
        keeps: two for a two-tier kind (cold blocks behind a full-precision residual: think, kivi),
        else one."""
        two_tier = self.key_channels is not None or self.quantization is not None
        return 2 if two_tier and self.host_tier is None and self.latent_layers is None else 1


def build_cache(request: CacheRequest, cfg, kv_cache_memory: int, block_size: int, dtype: torch.dtype, device,
                inv_freq: torch.Tensor, host_memory: int = 0) -> PagedKVCache:
    """The cache for `request` over a pool of `kv_cache_memory` bytes (cfg: the model's shape;
    inv_freq: its RoPE frequencies, which a latent cache applies to the keys it rebuilds; host_memory:
    the bytes of a host tier's pool)."""
    if request.host_tier is not None:
        tier = request.host_tier
        cache = OffloadedKVCache.from_memory(cfg, kv_cache_memory, host_memory, block_size, dtype, device,
                                             tier.summary_fields, tier.summary_bounds, tier.device_window,
                                             tier.skip_layers)
    elif request.latent_layers is not None:
        cache = LatentKVCache.from_memory(cfg, kv_cache_memory, request.latent_layers, request.group, inv_freq,
                                          block_size, dtype, device)
    elif request.key_channels is not None:
        cache = PrunedKVCache.from_memory(cfg, kv_cache_memory, block_size, request.key_channels, dtype, device)
    elif request.quantization is not None:  # blocks sized by the quantization (block_size does not apply)
        windowed = [w for w in cfg.sliding_windows if w is not None]
        if windowed:
            raise ValueError(f"quantized KV blocks hold no positions, so they cannot serve this model's sliding-window "
                             f"layers (window {windowed[0]}); use a full-precision method")
        request.quantization.field_shapes(cfg.head_dim)  # a group size that does not divide head_dim fails here
        cache = QuantizedKVCache.from_memory(cfg, kv_cache_memory, request.quantization, dtype, device)
    else:
        cache = (PairedKVCache if request.pairs else PagedKVCache).from_memory(
            cfg, kv_cache_memory, block_size, dtype, device, request.slot_fields, key_bounds=request.key_bounds)
    if request.sources is not None:  # layers that read another's KV hold no blocks
        cache.share_layers(request.sources)
    if request.pairs:
        cache.pair_layers(request.pairs)
    return cache
