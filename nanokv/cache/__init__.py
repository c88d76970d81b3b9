"""The KV cache. For now one contiguous cache per sequence (contiguous.py); the head-block
pool that compression methods work inside replaces it with the batching engine."""

from nanokv.cache.contiguous import ContiguousKVCache

__all__ = ["ContiguousKVCache"]
