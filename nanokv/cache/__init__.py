"""The KV cache: a pool of head-blocks (pool.py), per-(sequence, layer, kv-head) block tables
over it (kv_cache.py), the quantized block kind (quant_pool.py, quant_cache.py), tokens stored
as low-rank latents (latent_cache.py), older keys in fewer channels (pruned_cache.py), two
layers' prompt stored once (paired.py). Each block kind reads its own way (`attend_decode`,
`attend_prefill`) through the kernels; the step's attention that calls them, and where a
compression method acts, is nanokv/engine/attention.py."""

from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.latent_cache import LatentKVCache
from nanokv.cache.paired import PairedKVCache
from nanokv.cache.pool import BlockPool, OutOfBlocks
from nanokv.cache.pruned_cache import PrunedKVCache
from nanokv.cache.quant_cache import QuantizedKVCache

__all__ = ["BlockPool", "LatentKVCache", "OutOfBlocks", "PagedKVCache", "PairedKVCache",
           "PrunedKVCache", "QuantizedKVCache"]
