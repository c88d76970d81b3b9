"""The KV cache: a pool of head-blocks (pool.py), per-(sequence, layer, kv-head) block tables
over it (kv_cache.py), the quantized block kind (quant_pool.py, quant_cache.py), tokens stored
as low-rank latents (latent_cache.py), older keys in fewer channels (pruned_cache.py), two
layers' prompt stored once (paired.py), and the attention callable the model calls
(attention.py)."""

from nanokv.cache.attention import CacheAttention
from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.latent_cache import LatentKVCache
from nanokv.cache.paired import PairedKVCache
from nanokv.cache.pool import BlockPool, OutOfBlocks
from nanokv.cache.pruned_cache import PrunedKVCache
from nanokv.cache.quant_cache import QuantizedKVCache

__all__ = ["BlockPool", "CacheAttention", "LatentKVCache", "OutOfBlocks", "PagedKVCache", "PairedKVCache",
           "PrunedKVCache", "QuantizedKVCache"]
