"""hashevict: evict the key whose SimHash code is farthest (Hamming) from the current query's.

Paper: HashEvict: A Pre-Attention KV Cache Eviction Strategy using Locality-Sensitive Hashing
(Liu, Rabbani, O'Halloran, Sankaralingam, Hartley, Gravelle, Huang, Fermüller, Aloimonos; 2024;
first shown as LSH-E at a NeurIPS 2024 workshop), arXiv 2412.16187. The authors' code is the
"lsh" cache strategy of their cold-compress fork: minghui-liu/cold-compress @ b2ae9f0, cache.py
KVCacheLSH, cache_configs/lsh.yaml.
A key that is cosine-dissimilar to the query gets little attention, and sign random
projections (SimHash) estimate cosine similarity cheaply. The angle between two vectors is
about π × the fraction of hyperplanes that separate them. So each cached key keeps a
`hash_bits`-bit code, the signs of its projections on random Gaussian hyperplanes (one set per
layer, shared by its heads), stored here as an int slot field. Each step the current query is
hashed the same way, and a full cache evicts the key at the largest Hamming distance from it.
The first `global_tokens` and the newest `recent_tokens` are never evicted. At prefill, the
same rule with the prompt's last query picks what the prompt keeps.
Defaults: hash_bits 16 (cold-compress --lsh_dim), global_tokens 4 and recent_tokens 10
(cache_configs/lsh.yaml).

What differs:
- After attention, not before. The paper decides before the step's attention, so the new
  token replaces the victim and the query never reads it. nanokv evicts after the step's
  attention (decode_scores comes with the probabilities, unused here), so the query still
  reads the key it then evicts. Nothing is saved in compute, only in memory.
- The query, as in the paper. The official code compares the incoming token's key code with the
  cached keys' codes (its cache update never sees the query).
- The prompt: the official code cuts a prompt longer than the cache to its first and last
  tokens (prompt_compression_strategy recent_global, the default). Here the prompt's last
  query's code ranks it, the rule decode applies at the next step.
- GQA (the official code is run with repeated kv-heads): each query head's distance to the
  kv-head's keys, averaged over the group.
- The hyperplanes come from a hash of (seed, layer, bit, channel) through Box-Muller, so they
  do not depend on the batch, the slot order or a generator's state. The official code draws
  them with torch.randn at cache construction.
- Ties (Hamming distances are integers) go to the oldest token. The official code takes
  argmin's first slot.
"""

import math

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, hashed_uniform

MAX_BITS = 32  # codes live in an int64 slot field; popcount() below counts 32 bits


def hyperplanes(seed: int, layer: int, head_dim: int, bits: int, device) -> torch.Tensor:
    """[head_dim, bits] standard Gaussian draws (Box-Muller over two hashed uniforms): the
    layer's random hyperplanes, the same whatever the batch or device order."""
    bit = torch.arange(bits, device=device)[None, :]
    channel = torch.arange(head_dim, device=device)[:, None]
    u1 = hashed_uniform(seed, layer, bit, channel)
    u2 = hashed_uniform(seed ^ 0x5BD1E995, layer, bit, channel)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> [...] int64: bit j set where x lies on the positive side of hyperplane j."""
    signs = (x.float() @ planes) >= 0
    weights = 1 << torch.arange(planes.shape[1], device=x.device, dtype=torch.int64)
    return (signs.long() * weights).sum(dim=-1)


def popcount(x: torch.Tensor) -> torch.Tensor:
    """The set bits of each int64 in [0, 2^32): the SWAR bit count, in int64 without overflow."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def hamming(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """query_codes [..., Hq], key_codes [..., H, S] -> [..., H, S] float32: each key's Hamming
    distance to the codes of its group's query heads, averaged over the group."""
    H = key_codes.shape[-2]
    q = query_codes.unflatten(-1, (H, -1))[..., None]                   # [..., H, group, 1]
    return popcount(q ^ key_codes[..., None, :]).float().mean(dim=-2)


class HashEvict(DecodeEvictor):
    name = "hashevict"
    description = "evict the key whose SimHash code is farthest (Hamming) from the query's; sinks and recent kept"
    paper = "https://arxiv.org/abs/2412.16187"
    options = {
        "hash_bits": (int, 16, f"an integer in [1, {MAX_BITS}] (bits of each key's SimHash code)",
                      lambda v: 1 <= v <= MAX_BITS),
        "global_tokens": (int, 4, "an integer >= 0 (the first tokens, never evicted)", lambda v: v >= 0),
        "recent_tokens": (int, 10, "an integer >= 0 (the newest tokens, never evicted)", lambda v: v >= 0),
        "seed": (int, 0, "an integer >= 0 (the random hyperplanes)", lambda v: v >= 0),
    }
    slot_fields = {"hashevict_code": torch.int64}
    decode_reads = frozenset({"keys", "queries"})

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        self._planes = {}  # (layer, head_dim, device) -> hyperplanes, made once

    def check_budget(self):
        protected = self.global_tokens + self.recent_tokens
        if self.budget is not None and self.budget <= protected:
            raise ValueError(f"budget={self.budget} must exceed global_tokens + recent_tokens = {protected} "
                             f"for hashevict")

    def planes(self, layer: int, head_dim: int, device) -> torch.Tensor:
        key = (layer, head_dim, str(device))
        if key not in self._planes:
            self._planes[key] = hyperplanes(self.seed, layer, head_dim, self.hash_bits, device)
        return self._planes[key]

    def recent_window(self, budget):
        return torch.full_like(budget, self.recent_tokens)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        planes = self.planes(view.layer, view.keys.shape[-1], view.keys.device)
        return {"hashevict_code": simhash(view.keys, planes)}

    def scores(self, view: PrefillView) -> torch.Tensor:
        """-(Hamming distance to the last prompt query's code); sinks and the recent window +inf."""
        planes = self.planes(view.layer, view.keys.shape[-1], view.keys.device)
        distance = hamming(simhash(view.queries[-1], planes), self.state_of(view)["hashevict_code"])
        scores = (-distance).masked_fill(view.positions[None] < self.global_tokens, float("inf"))
        return self.protect_recent(scores)

    def decode_scores(self, probs, state, step):
        planes = self.planes(step.layer, step.keys.shape[-1], step.keys.device)
        # the query's own token is new this step: hash its key into its slot's code
        new = step.visible & (step.key_positions == step.positions[:, None, None])            # [b, H, S]
        at = new.long().argmax(dim=-1, keepdim=True)                                            # [b, H, 1]
        new_key = step.keys.gather(2, at[..., None].expand(*at.shape, step.keys.shape[-1]))[:, :, 0]
        codes = torch.where(new, simhash(new_key, planes)[..., None], state["hashevict_code"])
        scores = -hamming(simhash(step.queries, planes), codes)
        scores = scores.masked_fill(step.key_positions < self.global_tokens, float("inf"))
        return scores, {"hashevict_code": codes}
