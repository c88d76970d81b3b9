"""minicache: adjacent layers from the middle of the model on keep one merged copy of the prompt.

Paper: MiniCache: KV Cache Compression in Depth Dimension for Large Language Models (Liu et al.,
2024), arXiv 2405.14366. From the middle of the model on, the KV vectors of a token at two
adjacent layers point in nearly the same direction and differ mostly in length, so a pair of
layers (a, b) = (l, l + 1) can keep one direction per token and a magnitude per layer.

At the end of a sequence's prefill, per token and kv-head, separately for keys and for values:
each layer's vector splits into its L2 norm and unit direction, x = |x| u; the pair's direction
is the SLERP of the two, Omega = arccos(clamp(u_a . u_b, -1, 1)),
    e = sin((1 - t) Omega) / sin Omega * u_a + sin(t Omega) / sin Omega * u_b
(a LERP where sin Omega ~ 0), renormalized; layer a then reads e |x_a|, layer b e |x_b|. The
tokens whose directions lie farthest apart (the largest angular distance Omega / pi) are
retained: both layers keep their own vectors. nanokv/cache/paired.py stores it: layer a holds
every token (a merged one as e |x_a|, with b's two magnitudes as slot fields), layer b only its
retained prompt tokens and what follows the prompt; its other blocks go back to the pool.

Knob: `compression=r` merges P = floor(r L + 1/2) pairs, the top 2P layers (at most every layer:
r <= 0.5), so about r of the prompt's KV goes (P (1 - retention) / L exactly). r = 0.25 merges
from layer L / 2 on, the paper's setting. A budget does not apply (the unit is a layer pair).

Bytes (what `cache.theoretical_bytes` reports, within a few percent of the paper's figure): per
(sequence, kv-head), a layer outside the pairs holds T tokens x (2 D s + 4) (K, V in the cache
dtype of s bytes, an int32 position); a pair holds n prompt tokens of which r = ceil(gamma n)
are retained, and g tokens after the prompt:
    (n - r) x (2 D s + 4 + 4 m)      one direction for K and V, four magnitudes of m bytes
  + (r + g) x 2 x (2 D s + 4)        both layers' own vectors
the paper's figure. nanokv stores each merged token's direction times a's magnitude (so a's
magnitudes cost nothing) and b's two magnitudes as float32 slot fields, which the pool gives
every slot of every layer: 8 bytes a slot more than K, V and position everywhere.

Defaults: interpolation t = 0.6 (the paper's SLERP parameter; KVCache-Factory's
pyramidkv/minicache.py, where it weighs the later layer), retention gamma = 0.05 (KVCache-Factory:
per head, the top ceil(gamma S) tokens by distance).
Paper only: AkideLiu/MiniCache @ f1baccac is a project page with no code; cross-checked with
KVCache-Factory pyramidkv/minicache.py @ c97f9d7 (third-party, "MiniCache-style").
What differs:
- only the prompt is merged (the project page merges in prefilling and decoding): tokens
  generated after it, and a question that follows a compressed context, are kept unmerged in
  both layers, as SnapKV-family methods keep them.
- retention: per head the top ceil(gamma S) tokens by angular distance (KVCache-Factory's rule);
  the paper's gamma is a threshold on the normalised distance range. The keys' distance picks
  them, and a retained token keeps its keys and values both (one set per head: b holds one
  length per head).
- the pairs sit at the top of the model (for an odd count of layers to pair, from layer L - 2P
  on: L = 30, r = 0.25 merges layers 14..29, the paper from 15); magnitudes are float32.
- not stacked on 4-bit KIVI, as the paper's headline numbers are.
"""

from __future__ import annotations

import math

import torch

from nanokv.methods.base import Method

TINY = 1e-30  # a merged token's magnitude at b is at least this: 0 marks the slots b does not read


def slerp_merge(x_a: torch.Tensor, x_b: torch.Tensor, t: float):
    """x_a, x_b [..., D] -> (e [..., D] the unit SLERP direction at t, |x_a|, |x_b| [...], the
    angular distance Omega / pi [...] in [0, 1]). float32."""
    x_a, x_b = x_a.float(), x_b.float()
    mag_a, mag_b = x_a.norm(dim=-1), x_b.norm(dim=-1)
    u_a, u_b = x_a / mag_a.clamp(min=TINY)[..., None], x_b / mag_b.clamp(min=TINY)[..., None]
    omega = torch.acos((u_a * u_b).sum(-1).clamp(-1, 1))
    sin = torch.sin(omega)
    slerp = sin > 1e-6
    safe = torch.where(slerp, sin, torch.ones_like(sin))
    w_a = torch.where(slerp, torch.sin((1 - t) * omega) / safe, torch.full_like(sin, 1 - t))
    w_b = torch.where(slerp, torch.sin(t * omega) / safe, torch.full_like(sin, t))
    e = w_a[..., None] * u_a + w_b[..., None] * u_b
    return e / e.norm(dim=-1, keepdim=True).clamp(min=TINY), mag_a, mag_b, omega / math.pi


def retained(distance: torch.Tensor, gamma: float) -> torch.Tensor:
    """distance [H, S] -> [H, S] bool: per head the ceil(gamma S) tokens farthest apart."""
    H, S = distance.shape
    k = min(S, math.ceil(gamma * S - 1e-9))
    keep = torch.zeros(H, S, dtype=torch.bool, device=distance.device)
    return keep.scatter_(1, distance.topk(k, dim=-1).indices, True) if k else keep


class MiniCache(Method):
    name = "minicache"
    description = "adjacent layers from the middle on share one SLERP direction per prompt token, each its magnitude"
    paper = "https://arxiv.org/abs/2405.14366"
    options = {
        "interpolation": (float, 0.6, "a number in [0, 1] (the SLERP weight of the pair's later layer)",
                          lambda v: 0 <= v <= 1),
        "retention": (float, 0.05, "a number in [0, 1] (share of the prompt's tokens each head keeps unmerged)",
                      lambda v: 0 <= v <= 1),
    }
    # layer b's magnitudes of each merged token, on layer a's slot (0: a slot b does not read)
    slot_fields = {"k_mag_b": torch.float32, "v_mag_b": torch.float32}
    # a pair's later layer rewrites the earlier one at the end of prefill: what follows the prompt
    # (a question, a recompute's generated tokens) must run after, over the merged cache (base.py)
    trims_earlier_layers = True

    def check_budget(self):
        if self.budget is not None:
            raise ValueError("minicache merges whole layer pairs: give compression (r merges the top 2r of the "
                             "layers in pairs, at most 0.5), not budget")
        if self.compression > 0.5:
            raise ValueError(f"minicache: compression={self.compression} would merge the top {2 * self.compression:g} "
                             f"of the layers in pairs; at most 0.5 (every layer paired)")

    def layer_pairs(self, num_layers: int) -> list[tuple[int, int]] | None:
        if not self.compresses:
            return None
        pairs = min(num_layers // 2, math.floor(self.compression * num_layers + 0.5))
        if pairs < 1:
            raise ValueError(f"minicache: compression={self.compression} merges no layer pair of a {num_layers}-layer "
                             f"model; give at least {1 / num_layers:.3g}")
        first = num_layers - 2 * pairs
        return [(first + 2 * i, first + 2 * i + 1) for i in range(pairs)]


    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        seconds = {b for _, b in self.layer_pairs(num_layers) or []}
        return min(n, math.ceil(self.retention * n - 1e-9)) if layer in seconds else n

    def merge_pair(self, keys_a: torch.Tensor, values_a: torch.Tensor, keys_b: torch.Tensor,
                   values_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompt's K/V [H, S, D] at a pair's layers a and b -> what the cache stores: layer a's
        new contents "k", "v" [H, S, D] (e |x_a| where merged, its own where retained), b's
        magnitudes "k_mag_b", "v_mag_b" [H, S] (0 where retained), and "keep" [H, S] bool: the
        tokens layer b keeps of its own (the retained ones)."""
        t = self.interpolation
        e_k, k_mag_a, k_mag_b, distance = slerp_merge(keys_a, keys_b, t)
        e_v, v_mag_a, v_mag_b, _ = slerp_merge(values_a, values_b, t)
        keep = retained(distance, self.retention)
        held = keep[..., None]
        return {"k": torch.where(held, keys_a.float(), e_k * k_mag_a[..., None]),
                "v": torch.where(held, values_a.float(), e_v * v_mag_a[..., None]),
                "k_mag_b": torch.where(keep, 0.0, k_mag_b.clamp(min=TINY)),
                "v_mag_b": torch.where(keep, 0.0, v_mag_b),
                "keep": keep}
