"""PrefixCache: blocks of identical prompt prefixes, held once and shared by every sequence that
holds them (vLLM's and nano-vllm's automatic prefix caching), over nanokv's head-blocks.

An *entry* is what one key addresses: the blocks of every (layer, kv-head) for one run of tokens.
Two kinds, both plain storage (which prompts may share, and under what key, is the engine's call:
nanokv/engine/prefix_sharing.py):

    a prefix block   tokens [i * bs, (i + 1) * bs) of a prompt, all L x H head-blocks [L, H],
                     keyed by a chain hash: hash(previous block's key, these tokens), so a key
                     names the whole prefix up to it
    a compressed     a prompt's compressed part as a method left it: per (layer, head) its block
    prompt           list [L, H, nb] and length [L, H]. Full blocks are shared; a head's partial
                     last block is a copy the entry owns (a sequence that attaches it copies it
                     again before appending, so nothing ever writes into a shared block)

Each entry counts the sequences holding it (`refs`). At 0 it keeps its blocks, content and key,
and joins an LRU list: its blocks count as free (`BlockPool.cached_free`) and a later prompt can
still hit it, but the pool takes them back (`evict`, the oldest entry first) as soon as an
allocation finds no truly free block. Keys are blake2b digests and an entry keeps its tokens, so
a lookup checks the tokens too (a hash is not proof).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from nanokv.cache.pool import HOST, BlockPool


@dataclass(eq=False)
class Entry:
    key: bytes
    tokens: tuple[int, ...]        # the tokens it holds: a lookup compares them
    blocks: torch.Tensor           # [L, H] (a prefix block) or [L, H, nb] (-1 past a head's blocks), HOST
    lengths: torch.Tensor | None   # [L, H] tokens each head holds (a compressed prompt); None: a full block each
    refs: int = 0                  # sequences holding it; 0: on the LRU list

    @property
    def ids(self) -> torch.Tensor:
        """Every block id it owns, flat."""
        return self.blocks[self.blocks >= 0]


def chain_key(parent: bytes, tokens) -> bytes:
    """The key of a block of `tokens` that follows the prefix keyed `parent` (b"" + a namespace for the
    first): a digest of both, so equal keys mean equal prefixes, namespace included."""
    data = torch.tensor(list(tokens), dtype=torch.int64, device=HOST).numpy().tobytes()
    return hashlib.blake2b(parent + b"|" + data, digest_size=16).digest()


class PrefixCache:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.entries: dict[bytes, Entry] = {}
        self.unused: OrderedDict[bytes, Entry] = OrderedDict()   # refs == 0, least recently released first
        self.shared = torch.zeros(pool.num_blocks, dtype=torch.bool, device=HOST)  # owned by some entry
        pool.reclaim = self.evict  # an allocation that finds too few truly free blocks takes these back

    def get(self, key: bytes, tokens) -> Entry | None:
        entry = self.entries.get(key)
        return entry if entry is not None and entry.tokens == tuple(tokens) else None

    def insert(self, key: bytes, tokens, blocks: torch.Tensor, lengths: torch.Tensor | None = None) -> Entry:
        """A new entry over blocks that one sequence holds now (refs 1). Its blocks are shared from
        now on: a sequence's free leaves them to the entry."""
        if key in self.entries:
            raise ValueError("prefix cache: key already cached")
        lengths = None if lengths is None else lengths.to(HOST).clone()
        entry = Entry(key, tuple(tokens), blocks.to(HOST).clone(), lengths, refs=1)
        self.entries[key] = entry
        self.shared[entry.ids] = True
        return entry

    def acquire(self, entry: Entry):
        """One more sequence holds it (off the LRU list if it was there)."""
        if entry.refs == 0:
            del self.unused[entry.key]
            self.pool.cached_free -= len(entry.ids)
        entry.refs += 1

    def release(self, entry: Entry):
        """One sequence fewer; at 0 it goes on the LRU list, newest last, its blocks counted free."""
        if entry.refs <= 0:
            raise RuntimeError("prefix cache: releasing an entry nobody holds")
        entry.refs -= 1
        if entry.refs == 0:
            self.unused[entry.key] = entry
            self.pool.cached_free += len(entry.ids)

    def evict(self, n: int) -> int:
        """Give at least n blocks back to the pool, dropping unused entries oldest first (their keys
        with them) -> blocks given back (fewer when the LRU list runs dry)."""
        freed = 0
        while freed < n and self.unused:
            _, entry = self.unused.popitem(last=False)
            del self.entries[entry.key]
            ids = entry.ids
            self.shared[ids] = False
            self.pool.cached_free -= len(ids)
            self.pool.free(ids)
            freed += len(ids)
        return freed

    @property
    def cached_blocks(self) -> int:
        """Blocks held by entries, in use or not."""
        return int(self.shared.sum())
