"""fastgen: profile each head on the prompt, then keep per head only the kinds of tokens its
attention needs (special tokens, punctuation, heavy hitters, a local window, or everything).

Paper: Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs (Ge, Zhang, Liu,
Zhang, Han, Gao; ICLR 2024), arXiv 2310.01801. Heads differ: some attend almost only to special
tokens, some to punctuation, some to recent tokens, some everywhere. After the prompt each head
takes the cheapest policy of (Eq. 2)
    0 C_special, 1 C_special+punct, 2 C_special+punct+frequent, 3 C_special+punct+frequent+local,
    4 C_full
whose kept tokens recover at least T of the head's prompt attention (Eq. 1), and applies it to
the prompt and to every token generated after:
- special: the first `special_tokens` positions and tokens whose text is a control token
  (<|...|>, <s>, </s>, [INST], [/INST]);
- punct: tokens whose text, spaces aside, is all punctuation (".", ":", "?", ",\n", ...);
- frequent: the ceil(r_f n) tokens of the rest with the highest cumulative attention (n: the
  sequence's current length), the cumulative attention summed over the prompt's queries and every
  decode query since (averaged over the query heads of the kv-head's group);
- local: the newest ceil(r_l n0) positions (n0: the prompt's length).
A head's recovery is the attention mass its policy keeps, averaged over the prompt's queries (the
local window taken relative to each query) and over the query heads of its group.

The request: compression=r sets T = 1 - r, the attention mass a head may lose (the paper's only
knob: "only change the recovery ratio T to control the pruned KV cache ratio"); how much is
pruned then follows from the heads' profiles. A budget in tokens has no meaning here and is
refused.

Defaults: r_f = r_l = 0.3 (paper Section 5.1, "We set r_l = 0.3, r_f = 0.3"); T from the request
(the paper's runs use T = 0.91-0.98, Table 1: compression=0.05 is T = 0.95, Section 4.1's
profiling threshold); special_tokens=1 (the BOS / first token; the paper lists <s>, [INST]).
No official code: machilusZ/FastGen, the paper's link, holds only a README (checked @ 91dc19b);
facts cross-checked against a third-party port, AnswerDotAI/cold-compress @ 15bb300 (cache.py
KVCacheHybrid: recovery as the mean over prompt queries of the kept mass, per-query local window,
heavy hitters among the tokens not already kept).

What differs:
- GQA: one policy per kv-head from its group's mean recovery (the paper is multi-head only).
- heavy hitters are counted among the tokens that are neither special nor punctuation (as the
  port does); the paper only says "keep the most frequent".
- a prefill's profile uses every prompt query (as the paper's A = softmax(QK^T)), float32.
"""

import math
import string
import unicodedata

import torch

from nanokv.methods.base import DecodeEvictor, DecodeStep, PrefillView, head_value, prompt_logits

SPECIAL = 1          # fg_kind bits
PUNCT = 2
POLICIES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")
EPS = 1e-9  # ceil(0.3 x 10) is 3, not the 4 of 3.0000000000000004
CONTROL = frozenset({"<s>", "</s>", "[INST]", "[/INST]"})


def is_punctuation(text: str) -> bool:
    """A token made of punctuation alone, spaces and line breaks around it aside."""
    core = text.strip()
    return core != "" and all(c in string.punctuation or unicodedata.category(c).startswith("P") for c in core)


def is_control(text: str) -> bool:
    return text in CONTROL or (len(text) > 4 and text.startswith("<|") and text.endswith("|>"))


class FastGen(DecodeEvictor):
    name = "fastgen"
    description = "per-head policy from a prompt profile: special tokens, +punctuation, +heavy hitters, +local window, or full"
    paper = "https://arxiv.org/abs/2310.01801"
    options = {
        "frequent_ratio": (float, 0.3, "a number in [0, 1] (r_f)", lambda v: 0 <= v <= 1),
        "local_ratio": (float, 0.3, "a number in [0, 1] (r_l)", lambda v: 0 <= v <= 1),
        "special_tokens": (int, 1, "an integer >= 0 (the first positions kept as special)", lambda v: v >= 0),
    }
    compression_hint = "fastgen takes compression=r: each head keeps the cheapest policy recovering 1 - r of its attention"
    needs_vocabulary = True   # punctuation and control tokens by their text
    needs_column_sums = True  # the prompt's cumulative attention: the frequency policy's scores
    budgets_from_state = True  # each head's own policy (a slot field), and a budget that grows with n
    # cumulative attention; the token's kind (SPECIAL | PUNCT bits); the head's policy (same in every slot)
    slot_fields = {"fg_freq": torch.float32, "fg_kind": torch.int32, "fg_policy": torch.int32}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kinds = None  # [vocab] int32: SPECIAL | PUNCT bits, from bind_vocabulary

    def check_budget(self):
        if self.budget is not None:
            raise ValueError(f"fastgen takes compression=r (the attention a head may lose, T = 1 - r), not "
                             f"budget={self.budget}: how much each head keeps follows from its profile")

    @property
    def recovery(self) -> float:
        return 1.0 - self.compression

    def bind_vocabulary(self, texts: list[str]):
        self.kinds = torch.tensor([SPECIAL * is_control(t) + PUNCT * (is_punctuation(t) and not is_control(t))
                                   for t in texts], dtype=torch.int32, device="cpu")

    def kinds_on(self, device) -> torch.Tensor:
        """The vocabulary's kinds on `device`, moved there once (decode reads them every step)."""
        if self.kinds.device != torch.device(device):
            self.kinds = self.kinds.to(device)
        return self.kinds

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n  # a head may keep it all (C_full)

    # --- prefill: the profile ---------------------------------------------------------------

    def token_kinds(self, view: PrefillView) -> torch.Tensor:
        """[S] int32 SPECIAL | PUNCT bits of the cached tokens."""
        if view.token_ids is None or self.kinds is None:
            raise ValueError("fastgen needs the prompt's token ids and the vocabulary (the engine gives both)")
        device = view.keys.device
        ids = view.token_ids.to(device)
        known = ids < len(self.kinds)
        kinds = torch.where(known, self.kinds_on(device)[ids.clamp(max=len(self.kinds) - 1)], 0)
        first = torch.arange(len(ids), device=device) < self.special_tokens
        return torch.where(first, SPECIAL, kinds).to(torch.int32)

    def frequent_count(self, n: int) -> int:
        return math.ceil(self.frequent_ratio * n - EPS)

    def local_count(self, n: int) -> int:
        return math.ceil(self.local_ratio * n - EPS)

    def heavy_hitters(self, freq: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """[H, S] bool: each head's ceil(r_f S) highest cumulative attention among the tokens that
        are neither special nor punctuation."""
        S = freq.shape[1]
        plain = kinds == 0
        k = min(self.frequent_count(S), int(plain.sum()))
        top = freq.masked_fill(~plain, -math.inf).topk(k, dim=-1).indices
        return torch.zeros_like(freq, dtype=torch.bool).scatter_(-1, top, True)

    def recoveries(self, view: PrefillView, kinds: torch.Tensor, hitters: torch.Tensor) -> torch.Tensor:
        """[4, H]: the prompt attention each compressing policy keeps, averaged over the prompt's
        queries and the query heads of each kv-head's group."""
        H, S, _ = view.keys.shape
        T, Hq = view.queries.shape[:2]
        group = Hq // H
        special = (kinds & SPECIAL) > 0
        static = torch.stack([special, (kinds > 0)])                              # [2, S]
        hitters_q = (hitters | (kinds > 0)).repeat_interleave(group, dim=0)       # [Hq, S]
        window = self.local_count(S)
        kept = torch.zeros(4, Hq, device=view.keys.device)
        for start, logits in prompt_logits(view):
            probs = logits.softmax(dim=-1)                                        # [Hq, c, S]
            q_pos = view.positions[S - T + start:S - T + start + probs.shape[1]]
            kept[:2] += (probs[None] * static[:, None, None, :]).sum(dim=(-1, -2))
            kept[2] += (probs * hitters_q[:, None, :]).sum(dim=(-1, -2))
            local = view.positions[None, :] > q_pos[:, None] - window                # [c, S]
            kept[3] += (probs * (hitters_q[:, None, :] | local[None])).sum(dim=(-1, -2))
        return (kept / T).view(4, H, group).mean(dim=-1)

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The profile: each head's policy, with the tokens' kinds and cumulative attention."""
        H, S = view.keys.shape[:2]
        kinds = self.token_kinds(view)
        freq = view.column_sums.float()
        hitters = self.heavy_hitters(freq, kinds)
        enough = self.recoveries(view, kinds, hitters) >= self.recovery                   # [4, H]
        full = torch.ones(1, H, dtype=torch.bool, device=enough.device)
        policy = torch.cat([enough, full]).int().argmax(dim=0)                            # the first that recovers T
        view.sequence_state.setdefault("fastgen", {})[view.layer] = hitters
        return {"fg_freq": freq, "fg_kind": kinds.expand(H, S),
                "fg_policy": policy[:, None].expand(H, S).to(torch.int32)}

    def keeps(self, policy: torch.Tensor, kinds: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """[..., S] bool: what a head's policy keeps whatever its frequency: special tokens, and
        by policy punctuation (>= 1), the local window (>= 3), everything (4)."""
        policy = policy[..., None]
        return (((kinds & SPECIAL) > 0) | (((kinds & PUNCT) > 0) & (policy >= 1)) | (local & (policy >= 3))
                | (policy >= 4))

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        state = self.state_of(view)
        S = view.keys.shape[1]
        policy = state["fg_policy"][:, 0]
        local = torch.arange(S, device=view.keys.device) >= S - self.local_count(S)
        hitters = view.sequence_state["fastgen"][view.layer] & (policy[:, None] >= 2)
        keep = self.keeps(policy, state["fg_kind"], local) | hitters
        return None if bool(keep.all()) else keep

    # --- decode: each head applies its policy to what it holds --------------------------------

    def protected(self, state: dict[str, torch.Tensor], step: DecodeStep) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's policy [b, H], [b, H, S] what it keeps whatever its frequency)."""
        policy = head_value(state["fg_policy"], step)
        window = torch.ceil(self.local_ratio * step.prompt_lens.double() - EPS).long()
        local = step.key_positions > (step.positions - window)[:, None, None]
        return policy, step.visible & self.keeps(policy, state["fg_kind"], local)

    def decode_scores(self, probs, state, step: DecodeStep):
        freq = state["fg_freq"] + probs.mean(dim=2)
        new = {"fg_freq": freq}
        fed = step.token_ids  # a generated punctuation or control token is kept like a prompt one
        if fed is not None and self.kinds is not None:
            kinds = self.kinds_on(fed.device)
            kind = kinds[fed.clamp(max=len(kinds) - 1)] * (fed < len(kinds))              # [b]
            own = step.key_positions == step.positions[:, None, None]                   # the new token's slot
            state["fg_kind"] = new["fg_kind"] = torch.where(own, kind[:, None, None], state["fg_kind"]).to(torch.int32)
        policy, kept = self.protected(state, step)
        new["fg_policy"] = policy[..., None].expand_as(freq).to(torch.int32)
        return freq.masked_fill(kept, math.inf), new

    def decode_budgets(self, state: dict[str, torch.Tensor], step: DecodeStep) -> torch.Tensor:
        """What a head holds less the plain tokens beyond its ceil(r_f n) frequent ones."""
        policy, kept = self.protected(state, step)
        held = step.visible.sum(-1)
        n = (step.positions + 1).double()                                     # the sequence's length now
        frequent = torch.where(policy >= 2, torch.ceil(self.frequent_ratio * n - EPS).long()[:, None], 0)
        plain = held - kept.sum(-1)
        return held - (plain - frequent).clamp(min=0)
