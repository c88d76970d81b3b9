"""Prefix caching: which prompts share cached blocks, and how (the policy; the storage is
nanokv/cache/prefix_cache.py).

As in vLLM and nano-vllm, a prompt's full blocks are hash-addressed by a chain hash and shared
across requests; here a "block" of a prompt is all L x H head-blocks of its tokens
[i * bs, (i + 1) * bs). With compression, what may be shared depends on the method (issue 31: "a
compressed prompt is cached as compressed, keyed by (method, settings, prefix); a method that
must see the whole prompt before evicting simply does not share the uncompressed prefix"):

- **prefix** (raw blocks, namespace "full"): methods whose prefill stores exactly the KV `full`
  stores and that never change a held block afterwards. Admission attaches the longest cached
  prefix (at most (prompt - 1) // bs blocks: the last token must run to give logits) and the
  runner prefills only the rest, over it. When the prefill ends, the prompt's full blocks are
  registered.
- **compressed** (namespace: the method and every setting): prompt-eviction methods (they pick
  tokens at prefill, evict nothing while decoding, keep no host tier and no state outside the
  blocks). The compressed part (`Sequence.compress_len` tokens: with a (context, question)
  prompt, the context) is cached as the method left it, per (layer, head) block lists and
  lengths, keyed by a hash of those tokens; a later request with the same compressed part and
  something after it (a question) attaches it, copying each head's partial last block, and the
  runner runs only what follows (`ModelRunner._rest`), as the query-agnostic setting of kvpress
  reuses one document's compressed KV for many questions.
- **none**: the rest, for the reason `sharing_of` gives.

Which registered method shares what (tests/test_prefix_cache.py checks this list):

    prefix      full, quest, tidaldecode, recycled_attention, tokenselect, reattention, lserve, loki,
                double_sparsity, squeezed_attention (readers: dense prefill, state only at decode),
                and any method run without compression
    compressed  random, streaming_llm, knorm, snapkv, pyramidkv, adakv, sage_kv, nacl, simlayerkv,
                chunkkv, sepllm, kvzip, duoattention, headkv, kvmerger, pyramidinfer, dynamickv,
                dbudgetkv, retrieval_head, razorattention, fastkv, lazyllm, infinipot, citrus,
                cacheblend
    none        the decode-time evictors and mergers (h2o, tova, ..., cam, d2o, keepkv: they
                change held blocks every step), the quantizers (kivi, int4, ...: the residual is
                re-encoded in place), latents and slim keys (lorc, palu, eckvh, think), shared or
                paired layers (kvsharer, minicache), the host tier (arkvale, shadowkv, ...: tokens
                move out and a reader's index lives outside the blocks), sparse prefills
                (critiprefill, minference: a tail over a cached prefix would run dense, so the
                output would differ from a cold run), gemfilter (its re-prefill's positions live
                in the sequence: position_shift), homer (likewise: what follows its merged chunks
                sits after their suffix), rocketkv (it compresses, then reads with state
                outside the blocks)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.cache import PagedKVCache
from nanokv.cache.pool import HOST
from nanokv.cache.prefix_cache import Entry, chain_key
from nanokv.engine.sequence import Sequence
from nanokv.methods.base import Method, PrefillSelector

PREFIX, COMPRESSED, NONE = "prefix", "compressed", "none"


def sharing_of(method) -> tuple[str, str]:
    """(PREFIX, COMPRESSED or NONE, why) for a method as configured."""
    name = method.name
    if method.offloads:
        return NONE, f"{name} moves older tokens to a host tier, and its reader's index lives outside the blocks"
    if quantizes(method):
        return NONE, f"{name} re-encodes its full-precision residual in place as tokens settle (quantized blocks)"
    if method.stores_latents or method.prunes_key_channels:
        return NONE, f"{name} stores tokens in another block kind (latents or slim keys)"
    if type(method).layer_pairs is not Method.layer_pairs or type(method).layer_sources is not Method.layer_sources:
        return NONE, f"{name} shares or merges KV across layers (a layer writes into another's blocks)"
    if method.sparse_prefill:
        return NONE, (f"{name}'s prompt KV depends on the tiles it computed; a tail over a cached prefix runs "
                      "dense, so output would differ from a cold run")
    if not method.compresses:
        return PREFIX, f"{name} stores the prompt's KV exactly as full does and never changes a held block"
    if method.evicts_during_decode:
        return NONE, f"{name} evicts (or merges) in held blocks every decode step"
    # a filter pass: refill_layer is set once the model's depth is known, so the hook says it first
    if method.refill_layer is not None or getattr(type(method), "refill", PrefillSelector.refill) is not \
            PrefillSelector.refill:
        return NONE, f"{name} re-prefills its picks at new positions (position_shift lives in the sequence)"
    if method.merges_chunks:
        return NONE, f"{name} merges chunks, and what follows them sits at positions of its own (position_shift)"
    if method.selects_pages:
        return NONE, f"{name} compresses and then reads with per-sequence state kept outside the blocks (read_states)"
    if method.selects_tokens or method.blends:
        return COMPRESSED, f"{name} compresses at prefill only: its compressed prompt is cached as compressed"
    return NONE, f"{name} compresses in a way prefix caching does not know"


def quantizes(method) -> bool:
    """Does the method store tokens in quantized blocks (alone, or after an evictor: snapkv+kivi)?"""
    try:
        return method.quantization is not None
    except ValueError:  # a calibrated codec (kvquant, skvq) exists once its artifact is bound
        return True


@dataclass
class Hit:
    """What admission attaches to a sequence (kv_cache.attach)."""
    entries: list[Entry]
    tables: torch.Tensor       # [L, H, nb]
    lengths: torch.Tensor      # [L, H]
    copy_last: torch.Tensor | None = None  # [L, H] heads whose partial last block is copied first


class PrefixSharing:
    def __init__(self, cache: PagedKVCache, method):
        """method: the engine's; a sequence may carry its own (Sequence.method), whose policy is its own.
        Every method a pool serves stores what the pool stores (engine/request_methods.py), so two
        methods whose policy is PREFIX share raw blocks under one namespace."""
        self.cache, self.default = cache, method
        self.shares_blocks = type(cache) is PagedKVCache and not cache.uneven
        self.store = cache.enable_prefix_cache() if self.shares_blocks else None
        self.pending: dict[int, Hit] = {}   # a planned hit, attached when its sequence is admitted
        self.policies: dict[int, tuple[str, str, bytes]] = {}  # id(method) -> (kind, why, namespace)
        self.kind, self.reason, _ = self.policy(method)   # the engine's own, for the stats

    def policy(self, method) -> tuple[str, str, bytes]:
        """(kind, why, namespace) of a method on this cache."""
        if id(method) not in self.policies:
            kind, reason = sharing_of(method)
            if kind != NONE and not self.shares_blocks:
                kind, reason = NONE, f"the {type(self.cache).__name__} block kind does not share blocks"
            namespace = ("full" if kind == PREFIX else method.settings_key()).encode()
            self.policies[id(method)] = (kind, reason, namespace)
        return self.policies[id(method)]

    def policy_of(self, seq: Sequence) -> tuple[str, str, bytes]:
        return self.policy(seq.method if seq.method is not None else self.default)

    def forget(self, seq: Sequence):
        """A waiting sequence left (aborted): drop the hit planned for it."""
        self.pending.pop(seq.id, None)

    def plan(self, seq: Sequence, need: int) -> int:
        """The blocks the prefill of `seq` needs (need: without caching), less what the cache serves,
        plus the unused cached blocks it takes (they counted as free); sets seq.prefix_cached."""
        seq.prefix_cached = 0
        self.pending.pop(seq.id, None)
        kind, _, namespace = self.policy_of(seq)
        if kind == PREFIX:
            hit = self._prefix_hit(seq, namespace)
        elif kind == COMPRESSED:
            hit = self._compressed_hit(seq, namespace)
        else:
            return need
        if hit is None:
            return need
        self.pending[seq.id] = hit
        revived = sum(len(e.ids) for e in hit.entries if e.refs == 0)
        if kind == PREFIX:
            seq.prefix_cached = len(hit.entries) * self.cache.block_size
            return need - hit.tables.numel() + revived
        seq.prefix_cached = seq.compress_len
        lengths, tail = hit.lengths, len(seq) - seq.compress_len
        return int((self.cache.blocks_for(lengths + tail) - lengths // self.cache.block_size).sum()) + revived

    def attach(self, seq: Sequence):
        """Give an admitted sequence (just added to the cache) the blocks its plan found."""
        hit = self.pending.pop(seq.id, None)
        if hit is not None:
            self.cache.attach(seq.id, hit.entries, hit.tables, hit.lengths, hit.copy_last)

    def register(self, seq: Sequence):
        """After its prefill: cache what `seq` holds of its prompt (its full prompt blocks; or its
        compressed part)."""
        kind, _, namespace = self.policy_of(seq)
        if kind == PREFIX:
            bs, prompt, key = self.cache.block_size, seq.prompt_token_ids, namespace
            for i in range(len(prompt) // bs):
                tokens = prompt[i * bs:(i + 1) * bs]
                key = chain_key(key, tokens)
                if i * bs < seq.prefix_cached or key in self.store.entries:  # held already, or another's
                    continue
                self.cache.share_blocks(seq.id, key, tokens, i)
        elif kind == COMPRESSED and not seq.prefix_cached:
            n = seq.compress_len
            tokens = seq.prompt_token_ids[:n]
            key = chain_key(b"compressed|" + namespace, tokens)
            if key not in self.store.entries:
                # what follows the compressed part is held whole in every head
                lengths = self.cache.seqs[seq.id].lengths - (len(seq) - n)
                self.cache.share_prompt(seq.id, key, tokens, lengths)

    def _prefix_hit(self, seq: Sequence, namespace: bytes) -> Hit | None:
        bs, prompt, key, entries = self.cache.block_size, seq.prompt_token_ids, namespace, []
        for i in range((len(prompt) - 1) // bs):  # the last token runs: it gives the logits
            tokens = prompt[i * bs:(i + 1) * bs]
            key = chain_key(key, tokens)
            entry = self.store.get(key, tokens)
            if entry is None:
                break
            entries.append(entry)
        if not entries:
            return None
        k = len(entries)
        return Hit(entries, torch.stack([e.blocks for e in entries], dim=-1),
                   torch.full(entries[0].blocks.shape, k * bs, dtype=torch.int64, device=HOST))

    def _compressed_hit(self, seq: Sequence, namespace: bytes) -> Hit | None:
        n = seq.compress_len
        if len(seq) <= n:  # nothing follows the compressed part: its last token must run
            return None
        tokens = seq.prompt_token_ids[:n]
        entry = self.store.get(chain_key(b"compressed|" + namespace, tokens), tokens)
        if entry is None:
            return None
        return Hit([entry], entry.blocks, entry.lengths, entry.lengths % self.cache.block_size != 0)
