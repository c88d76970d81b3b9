"""Mixed precision by token: the shared mechanics of the ranking codecs (zipcache, mikv, qaq).

A ranking codec (cache/codec.py: `importance`) gets each token's importance with the block of R
tokens it stores. Its block is laid out statically, so the bytes are the stored ones: the rows
are sorted by importance (most important first; ties keep their order, so decode tokens, whose
importance is 0, come after the prompt's), the first `rows` of the block go into the fields of
the high-precision tier and the rest into those of the low-precision tier. Keys and values each
have their own two tiers (QAQ gives them different shares and bits). Attention over cold tokens
is order-free, so `decode` returns the rows in the order they are stored.

A tier (`Tier`) stores its rows in one of these ways:
- bits 16: float16 as is (MiKV's important tokens);
- grid "token": each row its own asymmetric grid over its D channels (codes packed along D, a
  float16 scale and zero point per row): ZipCache's values, MiKV's and QAQ's low tiers;
- grid "channel": each channel its own grid over the tier's rows (a scale and zero per channel):
  ZipCache's keys;
- `separable`: first each channel divided by c = sqrt(max |x_c|) over the tier's rows (stored,
  float16 [D]), then the token grid, then multiplied back: ZipCache's channel-separable
  token-wise quantization, and MiKV's channel balancer for keys;
- `outliers_ratio` r: each row's ceil(r/2 D) lowest and D - floor((1 - r/2) D) highest entries
  (QAQ's thresholds) are kept in float16 with their channel index (uint8) and left out of the
  row's grid: QAQ's outliers.

The arithmetic is KIVI's (kernels/quant.py: quantize, pack): scale = (max - min) / (2^b - 1),
rounded to float16 before the codes are taken, min as the zero point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanokv.cache.codec import Codec
from nanokv.kernels.quant import pack, quantize, unpack

SCALE_DTYPE = torch.float16
TIER_BITS = (2, 4, 8, 16)  # 16: float16 as is
GRIDS = ("token", "channel")


def rows_of(share: float, block_size: int) -> int:
    """Rows of a block the high tier holds: round(share * R), the same for every block."""
    return int(math.floor(share * block_size + 0.5))


@dataclass(frozen=True)
class Tier:
    """How one tier (the high or the low rows of a block) of keys or values is stored."""
    bits: int
    rows: int
    grid: str = "token"
    separable: bool = False
    outliers_ratio: float = 0.0

    def __post_init__(self):
        if self.bits not in TIER_BITS:
            raise ValueError(f"bits must be one of {TIER_BITS}, got {self.bits}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "channel" and (self.separable or self.outliers_ratio):
            raise ValueError("a channel grid takes neither separable nor outliers")

    def outliers(self, D: int) -> tuple[int, int]:
        """(lowest, highest) entries of a row kept apart: below or at the ceil(r/2 D)-th smallest,
        above the floor((1 - r/2) D)-th smallest."""
        r = self.outliers_ratio
        return (math.ceil(r / 2 * D), D - math.floor((1 - r / 2) * D)) if r else (0, 0)

    def shapes(self, D: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """This tier's fields (suffix -> dtype, shape per block); none when it holds no rows."""
        n = self.rows
        if n == 0:
            return {}
        if self.bits == 16:
            return {"values": (torch.float16, (n, D))}
        if D * self.bits % 8:
            raise ValueError(f"head_dim={D} does not pack into bytes at {self.bits} bits")
        per = (n,) if self.grid == "token" else (D,)
        shapes = {"codes": (torch.uint8, (n, D * self.bits // 8)), "scale": (SCALE_DTYPE, per),
                  "zero": (SCALE_DTYPE, per)}
        if self.separable:
            shapes["cscale"] = (SCALE_DTYPE, (D,))
        kept = sum(self.outliers(D))
        if kept:
            if D > 256:
                raise ValueError(f"outlier indices are uint8: head_dim={D} must be at most 256")
            shapes["oidx"] = (torch.uint8, (n, kept))
            shapes["oval"] = (torch.float16, (n, kept))
        return shapes

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [N, rows, D] float32 -> this tier's fields [N, *shape]."""
        if self.rows == 0:
            return {}
        if self.bits == 16:
            return {"values": x.to(torch.float16)}
        fields = {}
        if self.separable:
            # sqrt(max |x_c|): ZipCache's channel normaliser; float16 as stored, and never 0
            c = x.abs().amax(dim=1).sqrt().to(SCALE_DTYPE).float().clamp(min=torch.finfo(SCALE_DTYPE).tiny)
            fields["cscale"] = c.to(SCALE_DTYPE)
            x = x / c[:, None, :]
        lo, hi = self.outliers(x.shape[-1])
        if lo or hi:
            order = x.argsort(dim=-1)
            idx = torch.cat([order[..., :lo], order[..., x.shape[-1] - hi:]], dim=-1)
            fields["oidx"] = idx.to(torch.uint8)
            fields["oval"] = x.gather(-1, idx).to(torch.float16)
            # the grid spans the entries that are not outliers: clamp the outliers into their range
            ranked = x.gather(-1, order)
            x = x.clamp(ranked[..., lo:lo + 1], ranked[..., x.shape[-1] - hi - 1:x.shape[-1] - hi])
        if self.grid == "token":
            codes, scale, zero = quantize(x, self.bits, x.shape[-1], dim=-1, scale_dtype=SCALE_DTYPE)
            scale, zero = scale.reshape(x.shape[:-1]), zero.reshape(x.shape[:-1])   # a group: the row
        else:
            codes, scale, zero = quantize(x, self.bits, x.shape[-2], dim=-2, scale_dtype=SCALE_DTYPE)
            per = (*x.shape[:-2], x.shape[-1])                                         # a group: the rows
            scale, zero = scale.reshape(per), zero.reshape(per)
        fields.update(codes=pack(codes, self.bits), scale=scale, zero=zero)
        return fields

    def decode(self, fields: dict[str, torch.Tensor], lead: tuple[int, ...], D: int, device) -> torch.Tensor:
        """This tier's fields [..., *shape] -> float32 [..., rows, D] (lead: the leading dims)."""
        if self.rows == 0:
            return torch.zeros(*lead, 0, D, dtype=torch.float32, device=device)
        if self.bits == 16:
            return fields["values"].float()
        codes = unpack(fields["codes"], self.bits).float()
        if self.grid == "token":
            x = torch.addcmul(fields["zero"].float()[..., None], codes, fields["scale"].float()[..., None])
        else:
            x = torch.addcmul(fields["zero"].float()[..., None, :], codes, fields["scale"].float()[..., None, :])
        if "oidx" in fields:
            x = x.scatter(-1, fields["oidx"].long(), fields["oval"].float())
        if self.separable:
            x = x * fields["cscale"].float()[..., None, :]
        return x


class MixedPrecisionCodec(Codec):
    """A block's rows sorted by importance, each of K and V in a high tier then a low tier. A
    method's codec subclasses it with its `importance` and its tiers."""

    def __init__(self, block_size: int, k_tiers: tuple[Tier, Tier], v_tiers: tuple[Tier, Tier]):
        for name, tiers in (("key", k_tiers), ("value", v_tiers)):
            if sum(t.rows for t in tiers) != block_size:
                raise ValueError(f"the {name} tiers hold {sum(t.rows for t in tiers)} rows, not block_size={block_size}")
        self.block_size, self.tiers = block_size, {"k": k_tiers, "v": v_tiers}

    def field_shapes(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {f"{kv}_{level}_{suffix}": shape
                for kv, tiers in self.tiers.items() for level, tier in zip(("hi", "lo"), tiers)
                for suffix, shape in tier.shapes(head_dim).items()}

    def encode(self, k, v, layer, importance):
        if importance is None:  # a block with no ranking keeps its order
            importance = torch.zeros(k.shape[:2], dtype=torch.float32, device=k.device)
        # most important first; stable, so equal importances (decode tokens: 0) keep their order
        order = importance.float().argsort(dim=-1, descending=True, stable=True)[..., None]
        fields = {}
        for kv, x in (("k", k), ("v", v)):
            x = x.float().gather(1, order.expand(-1, -1, x.shape[-1]))
            start = 0
            for level, tier in zip(("hi", "lo"), self.tiers[kv]):
                for suffix, value in tier.encode(x[:, start:start + tier.rows]).items():
                    fields[f"{kv}_{level}_{suffix}"] = value
                start += tier.rows
        return fields

    def decode(self, fields, layer):
        main = next(name for name in fields if name.endswith(("_codes", "_values")))
        lead = tuple(fields[main].shape[:-2])  # a tier's codes / values are [..., rows, *]
        D = self._head_dim(fields)
        out = []
        for kv, tiers in self.tiers.items():
            parts = [tier.decode({name[len(kv) + len(level) + 2:]: value for name, value in fields.items()
                                  if name.startswith(f"{kv}_{level}_")}, lead, D,
                                 fields[main].device)
                     for level, tier in zip(("hi", "lo"), tiers)]
            out.append(torch.cat(parts, dim=-2))
        return out[0], out[1]

    def _head_dim(self, fields) -> int:
        for kv, tiers in self.tiers.items():
            for level, tier in zip(("hi", "lo"), tiers):
                if f"{kv}_{level}_codes" in fields:
                    return fields[f"{kv}_{level}_codes"].shape[-1] * 8 // tier.bits
                if f"{kv}_{level}_values" in fields:
                    return fields[f"{kv}_{level}_values"].shape[-1]
        raise ValueError("no field gives the head dimension")
