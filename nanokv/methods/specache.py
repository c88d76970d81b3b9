"""specache: a low-bit copy of every host key on the device finds each step's top-k, whose full
precision K/V are recalled from host memory.

Paper: SpeCache: Speculative Key-Value Caching for Efficient Generation of LLMs (Jie, Tang, Han, Deng,
Han; ICML 2025 ≈), arXiv 2503.16163 (OpenReview PQIrsaIQdn). The full-precision KV lives in CPU memory,
a low-bit (1 or 2 bit, KIVI-style) copy of it in VRAM. Each decode step scores every cached token
with the low-bit keys, fetches the top-k 16-bit KV pairs and attends over the low-bit cache with
those k pairs put back in full precision; to hide the fetch, the step also decodes a speculative
next token with the low-bit cache, whose top-k are prefetched for the next step while this one
computes.
Here: every token that moves to the host keeps, on the device, its key quantized per token and
kv-head, asymmetric over the head's channels (zero = the smallest channel, scale = range / (2^bits
- 1), codes rounded to nearest, packed 8 / bits to a byte); `pick` scores each host slot by
q . k / sqrt(D) of its dequantized key (the most over the kv-head's query heads), worked out from
the codes as scale * (q . codes) + zero * sum(q), and recalls the top `budget` slots; the newest
`device_window` tokens stay exact on the device.

Defaults: no official code. A third-party implementation added to a ShadowKV copy
(intelli-jsong/SpeCache @ b447f6f, specache/specache_2bit_config.yaml, quoting the paper's §4.1):
2 bits (1 is the other setting), top-k 64 16-bit pairs (`budget` 64 per kv-head), a full-precision
residual of 64 (`device_window` 64); every layer selective (skip_layers 0).

What differs:
- Unpicked tokens add nothing to the attention: the paper attends over every token, the low-bit
  K/V of the unpicked ones and the 16-bit K/V of the picked (that implementation's
  get_mixed_precision_kv_beta). The engine attends over the recalled picks and the device window
  only, and a recalled slot's value always comes from the host tier, so only keys are kept low-bit
  (what the pick needs). This is a sparse read picked by low-bit keys, not the paper's mixed-
  precision attention.
- No speculative token: nanokv decodes one token a step, so each step recalls the top-k of its own
  query (the pick SpeCache's speculation guesses ahead of time) and the fetch is not overlapped.
  The state keeps each layer's previous picks and counts how many of a step's picks the previous
  step had already picked (`state[("specache", layer)]["hits"]` of `["picks"]`): what a prefetch
  of the last picks would have covered. Bytes moved count every pick.
- The quantizer: keys per token (one scale and zero, float32, per token and kv-head, over the whole
  head): the cache keeps summaries as rows per token. KIVI and that implementation quantize keys
  per channel, a scale shared by a group of 64 tokens.
- GQA: the most over the group's query heads (≈; not checked against the paper).
"""

import torch
import torch.nn.functional as F

from nanokv.methods.base import Offloader, Picks, slot_mask, top_slots


def quantized(keys: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """keys [..., D] -> {"codes" [..., D * bits / 8] uint8, "scale" [...], "zero" [...]} float32: per
    row, asymmetric over its channels, rounded to nearest, 8 / bits codes a byte (lowest bits first)."""
    x = keys.float()
    zero = x.amin(-1)
    scale = (x.amax(-1) - zero) / (2 ** bits - 1)
    codes = ((x - zero[..., None]) / scale.clamp(min=1e-8)[..., None]).round().clamp(0, 2 ** bits - 1)
    codes = codes.to(torch.uint8).view(*x.shape[:-1], -1, 8 // bits)                # [..., D * bits / 8, per byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)
    return {"codes": (codes << shifts).sum(-1).to(torch.uint8), "scale": scale, "zero": zero}


def code_levels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes [..., D * bits / 8] uint8 -> each channel's code [..., D] float32, read through a
    table of the codes in every byte value (one lookup, not a shift, a mask and a cast per code)."""
    per_byte = 8 // bits
    byte = torch.arange(256, device=codes.device)
    table = (byte[:, None] >> torch.arange(0, 8, bits, device=codes.device)) & (2 ** bits - 1)  # lowest bits first
    # an embedding lookup: 4.5x faster than indexing the table on a CPU ([8, 3, 4000, 16] codes)
    return F.embedding(codes.int(), table.float()).view(*codes.shape[:-1], codes.shape[-1] * per_byte)


class SpeCache(Offloader):
    name = "specache"
    description = "low-bit keys on the device pick each step's top-k, recalled in full precision from the host"
    paper = "https://arxiv.org/abs/2503.16163"
    default_budget = 64
    options = {
        "bits": (int, 2, "1 or 2 (bits of the device's copy of each key channel)", lambda v: v in (1, 2)),
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 64, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
    }

    def summary_fields(self, head_dim):
        if head_dim * self.bits % 8:
            raise ValueError(f"specache packs {8 // self.bits} codes a byte: head_dim={head_dim} must be a multiple "
                             f"of {8 // self.bits} for bits={self.bits}")
        return {"codes": (torch.uint8, (head_dim * self.bits // 8,)), "scale": (torch.float32, ()),
                "zero": (torch.float32, ())}

    def summarize(self, view):
        return quantized(view.keys, self.bits)

    def pick(self, step):
        levels = code_levels(step.summary("codes"), self.bits)                          # [b, H, S, D]
        scale, zero = step.summary("scale")[:, :, None], step.summary("zero")[:, :, None]  # [b, H, 1, S]
        b, H, S, D = levels.shape
        q = step.queries.float().view(b, H, -1, D)
        # q . (scale * levels + zero) = scale * (q . levels) + zero * sum(q): scored from the codes,
        # never a dequantized copy of every key (which took most of a long prompt's decode step)
        logits = (torch.einsum("bhgd,bhsd->bhgs", q, levels) * scale + zero * q.sum(-1, keepdim=True)) / D ** 0.5
        logits = logits.masked_fill(~step.held()[:, :, None], float("-inf"))
        slots = top_slots(logits.amax(dim=2), self.budget)                              # [b, H, k]
        for j, state in enumerate(step.states):  # how many of these the previous step had picked
            s = state.setdefault(("specache", step.layer), {"hits": 0, "picks": 0})
            now = slots[j]
            if "last" in s:
                # the previous picks as a mask over the slots (comparing every pair took a quarter of a step)
                again = slot_mask(s["last"], S).gather(1, now.clamp(min=0)) & (now >= 0)
                s["hits"] = s["hits"] + again.sum()
                s["picks"] = s["picks"] + (now >= 0).sum()
            s["last"] = now
        per_token = D * self.bits // 8 + 8                                               # codes, scale, zero
        return Picks(slots=slots, scored_bytes=step.lengths.sum() * per_token)
