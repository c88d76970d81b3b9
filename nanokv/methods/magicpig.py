"""magicpig: sample the host keys that share LSH buckets with the query, weighed by 1 / their chance.

Paper: MagicPIG: LSH Sampling for Efficient LLM Generation (Chen, Sadhukhan, Ye, Zhou, Zhang,
Nolte, Tian, Douze, Bottou, Jia, Chen; ICLR 2025), arXiv 2410.16179; code Infini-AI-Lab/MagicPIG.
Top-k attention is biased when attention is not sparse; sampling keys is not. MagicPIG hashes every
key with SimHash into L tables of K bits each (a table's code: the signs of the key's projections on
K random hyperplanes). A decode step hashes the query the same way and samples the keys that share
its bucket in at least 2 of the L tables. A key at angle theta to the query shares one table's bucket
with probability u^K, u = 1 - theta / pi, so it is sampled with p = P(Binomial(L, u^K) >= 2); the
step attends over the samples with each logit lowered by log p (importance sampling: weight
exp(q.k) / p, the softmax normalizing over the samples), together with the exact sink and local
tokens. Keys are hashed centred (less the mean of the offloaded keys): a shift every logit of a
query shares, so attention is unchanged, but the keys spread around the origin, where SimHash's
hyperplanes tell them apart.
In nanokv, per kv-head of layers from `skip_layers` on: the newest `device_window` tokens stay on the
device (the local window); every older token moves to host memory and keeps its L codes on the
device (a summary field, int16 per table), hashed less the mean key of the first tokens the layer
moved (the prompt's; per-sequence state on the device, D floats per kv-head and layer). A step
recalls the host slots whose codes collide with any query head of the group in >= `min_collisions`
tables, and the first `sinks` host slots (the prompt moves oldest first: positions 0..sinks-1),
exact; at most `budget - device_window` slots, those of most collisions first. A sample's logit gets
-log(p + 1e-4), p from its centred key's angle. Layers that are a multiple of `dense_every` read
every host token (the official dense layers 0, 16, 32, ...; layer 0 is also the one of
`skip_layers`, which keeps it whole on the device).
Defaults (Infini-AI-Lab/MagicPIG evaluations/RULER/pred/attnserver_dist.py@ce3c810,
LSHSparseAttnServer: K = 10, L = 150, num_sink_tokens 4, num_local_tokens 64, dense_layers
[0, 16, 32, 48, 64], the collision mask `> 1`, the weight log(p + 1e-4); README@05baebe: K 10 with
L 150 (bench) or 170 (generation)); budget 2048 (≈, a cap of ours: see below).

What differs:
- No fixed budget in the paper (the sample size varies, a few % of the context at K=10, L=150);
  here `budget` caps what one head recalls (default 2048 tokens with the window): the sinks, then
  the samples of most collisions. A budget over the context never binds.
- GQA: picks are per kv-head, so a kv-head samples the union of its query heads' collisions and a
  sample's p is the highest over those heads (the official code samples per query head).
- The weights need each sample's angle to the query: the pick reads the host keys
  (`ReadStep.keys`, in host memory, where the official CPU attention reads them too); scored_bytes
  counts the codes read on the device and the sampled keys' bytes (host memory).
- Sinks are the oldest host slots, recalled each step (the official code keeps them on the GPU); a
  block moved at decode is hashed with the prompt's mean (the official decode keeps generated
  tokens on the GPU). The hyperplanes are hashed Gaussian draws per (seed, layer)
  (hashevict.hyperplanes), not one torch.randn shared by all layers; the tables live on the device.
- min_collisions=0 samples every key with p = 1 (weights 0): exact attention, for checks.
"""

import math

import torch

from nanokv.methods.base import Offloader, Picks
from nanokv.methods.hashevict import hyperplanes

MAX_BITS = 15  # a table's code is an int16


def table_codes(x: torch.Tensor, planes: torch.Tensor, bits: int) -> torch.Tensor:
    """x [..., D], planes [D, L * K] -> [..., L] int16: table t's code, the signs of x on its K planes."""
    signs = ((x.float() @ planes) >= 0).unflatten(-1, (-1, bits))              # [..., L, K]
    weights = 1 << torch.arange(bits, device=x.device, dtype=torch.int32)
    return (signs.int() * weights).sum(dim=-1).to(torch.int16)


def log_sampled_chance(cos: torch.Tensor, bits: int, tables: int, least: int) -> torch.Tensor:
    """log P(a key at cosine `cos` to the query shares >= `least` of `tables` buckets of `bits` bits):
    the binomial tail of the per-table chance u^K, u = 1 - theta / pi, summed in log space, plus
    1e-4 as the official code adds (a key sampled against the odds weighs at most 1e4).

    A small `least` (the default 2) sums the `least` terms below the tail and takes their
    complement, in float64, instead of the tables + 1 - least terms of the tail (on a CPU their exp
    was a fifth of a decode step): where the complement loses digits, the tail is below 1e-12, and
    the 1e-4 added outweighs it."""
    if least <= 0:
        return torch.zeros_like(cos)
    u = 1 - torch.arccos(cos.clamp(-1, 1)) / torch.pi
    one = (bits * u.clamp(min=1e-12).log()).exp().clamp(1e-12, 1 - 1e-7)          # per-table chance
    below = least <= tables // 2
    dtype = torch.float64 if below else torch.float32
    # log C(L, j) in float64: in float32, L = 150 loses 1e-4
    j = torch.arange(0, least, device=cos.device, dtype=torch.float64) if below else \
        torch.arange(least, tables + 1, device=cos.device, dtype=torch.float64)
    log_choose = (math.lgamma(tables + 1) - torch.lgamma(j + 1) - torch.lgamma(tables - j + 1)).to(dtype)
    j, one = j.to(dtype), one.to(dtype)
    terms = log_choose + j * one.log()[..., None] + (tables - j) * torch.log1p(-one)[..., None]
    # rounding can put the sum below the tail a hair over 1: a tail of 0, which the 1e-4 then outweighs
    log_tail = torch.log(-torch.expm1(terms.logsumexp(dim=-1).clamp(max=0))) if below else terms.logsumexp(dim=-1)
    return torch.logaddexp(log_tail, torch.full_like(log_tail, math.log(1e-4))).float()


class MagicPIG(Offloader):
    name = "magicpig"
    description = "LSH sampling: host keys colliding with the query in >= 2 SimHash tables, weighed by 1 / p"
    paper = "https://arxiv.org/abs/2410.16179"
    default_budget = 2048
    options = {
        "bits": (int, 10, f"an integer in 1..{MAX_BITS} (K: hyperplanes per table)", lambda v: 1 <= v <= MAX_BITS),
        "tables": (int, 150, "an integer >= 1 (L: hash tables)", lambda v: v >= 1),
        "min_collisions": (int, 2, "an integer >= 0 (tables a key must share with the query; 0: every key)",
                           lambda v: v >= 0),
        "sinks": (int, 4, "an integer >= 0 (the oldest tokens, always read exactly)", lambda v: v >= 0),
        "seed": (int, 0, "an integer >= 0 (the random hyperplanes)", lambda v: v >= 0),
        "dense_every": (int, 16, "an integer >= 0 (layers that are a multiple of it read every token; 0: none)",
                        lambda v: v >= 0),
        "skip_layers": (int, 1, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 64, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
    }

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        if self.min_collisions > self.tables:
            raise ValueError(f"min_collisions={self.min_collisions} of method 'magicpig' must be at most "
                             f"tables={self.tables}")
        self._planes = {}  # (layer, head_dim, device) -> [D, L * K] hyperplanes, made once

    def planes(self, layer: int, head_dim: int, device) -> torch.Tensor:
        key = (layer, head_dim, str(device))
        if key not in self._planes:
            self._planes[key] = hyperplanes(self.seed, layer, head_dim, self.tables * self.bits, device)
        return self._planes[key]

    def summary_fields(self, head_dim):
        return {"codes": (torch.int16, (self.tables,))}

    def summarize(self, view):
        """Codes of the moving keys, centred on the mean of the first keys this layer moved."""
        means = view.state.setdefault("magicpig_mean", {})
        if view.layer not in means:
            means[view.layer] = view.keys.float().mean(dim=1)                           # [H, D]
        keys = view.keys.float() - means[view.layer][:, None]
        return {"codes": table_codes(keys, self.planes(view.layer, keys.shape[-1], keys.device), self.bits)}

    def pick(self, step) -> Picks:
        held = step.held()                                                           # [b, H, S]
        slots = torch.arange(step.slots, device=held.device)
        if self.dense_every and step.layer % self.dense_every == 0:
            return Picks(slots=slots.expand_as(held).masked_fill(~held, -1))
        b, H, S = held.shape
        D = step.queries.shape[-1]
        q = step.queries.float().view(b, H, -1, D)                                   # [b, H, g, D]
        q_codes = table_codes(q, self.planes(step.layer, D, q.device), self.bits)    # [b, H, g, L]
        codes = step.summary("codes")                                                # [b, H, S, L]
        # tables shared with each query head, the most over the group's [b, H, S]: one head at a
        # time, its matches summed as bytes where the count fits one (a sum in a wider type first
        # copies every match into it: 4x slower on a CPU than the sum of the bytes)
        count = torch.uint8 if self.tables < 256 else torch.int32
        collisions = torch.stack([(codes == q_codes[:, :, j, None]).view(torch.uint8).sum(-1, dtype=count)
                                  for j in range(q.shape[2])]).amax(0)
        sink = slots < self.sinks
        sampled = held & (collisions >= self.min_collisions)
        rank = torch.where(sink, float(self.tables + 1), collisions.float())
        rank = rank.masked_fill(~(held & (sink | sampled)), float("-inf"))
        top = rank.topk(min(S, max(1, self.budget - self.device_window)), dim=-1)
        picked = top.indices.masked_fill(top.values == float("-inf"), -1)           # [b, H, k]
        # each sample's weight 1 / p from its angle to the query heads (the keys read in host memory)
        keys = step.keys.gather(2, picked.clamp(min=0).to(step.keys.device)[..., None].expand(-1, -1, -1, D))
        means = [state.get("magicpig_mean", {}).get(step.layer) for state in step.states]  # None: none moved yet
        mean = torch.stack([q.new_zeros(H, D) if m is None else m.to(q.device) for m in means])  # [b, H, D]
        keys = keys.to(q.device).float() - mean[:, :, None]                          # [b, H, k, D], centred
        cos = torch.einsum("bhgd,bhkd->bhgk", q, keys) / (q.norm(dim=-1)[..., None] * keys.norm(dim=-1)[:, :, None]).clamp(min=1e-12)
        # p rises with the cosine: the group's highest p is the p of its highest cosine
        log_p = log_sampled_chance(cos.amax(dim=2), self.bits, self.tables, self.min_collisions)
        is_sink = picked < self.sinks
        log_weights = torch.where(is_sink, 0.0, -log_p)
        scored = held.sum() * (self.tables * 2) + (picked >= 0).sum() * (D * step.itemsize)
        return Picks(slots=picked, log_weights=log_weights, scored_bytes=scored)
