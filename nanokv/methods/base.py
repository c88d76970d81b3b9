"""The contract between a compression method and the engine.

A method plays one or more roles, each a class below that it subclasses, with the hooks the
engine calls for it (nanokv/engine/attention.py):

    PrefillSelector  what each layer's prompt keeps (scores -> keep_mask)      snapkv, pyramidkv, ...
    DecodeEvictor    a PrefillSelector that also evicts every decode step      h2o, tova, cake, ...
    Merger           a PrefillSelector that folds what goes into what stays   kvmerger (cam, d2o: both)
    PageReader       the pages or tokens each decode step reads; evicts nothing quest, loki, ...
    Offloader        a PageReader whose older tokens live in host memory      arkvale, shadowkv, ...
    SparsePrefill    which tiles of a prompt's attention are computed         minference, critiprefill
    Method itself    the storage it asks for (cache_request): quantized blocks (kivi), latents
                     (lorc, palu), layer pairs (minicache), shared layers (kvsharer)

A method never touches storage. At the end of a sequence's prefill, for each layer right after
that layer's attention has run, the engine shows a PrefillSelector a `PrefillView` (the layer's queries, the
keys it just cached, their positions) and asks for a keep mask [kv_heads, tokens]; the cache
then compacts those heads and frees their tail blocks (nanokv/cache/kv_cache.py). Within one
forward pass no other layer reads layer l's KV, so this equals compressing after the pass.

Budgets are per request: `compression=r` keeps ceil((1 - r) * prompt tokens) per (layer, head)
(the fraction removed, as in kvpress); `budget=B` keeps B. Prompts already within budget are
left alone.

Decode-time methods (H2O, TOVA: DecodeEvictor) hold every (layer, head) at
the request's budget while it generates. Each decode step the engine hands them the current
query's attention probabilities over the held slots (`decode_scores`) and evicts, per head, the
lowest-scoring slot outside `recent_window` whenever a head holds more than its budget (the n
lowest when it holds n more: a method whose `decode_budgets` drop). State
a method keeps per token (H2O's accumulated attention) lives in the cache as slot fields
(`slot_fields`), set at prefill by `prefill_state` and moved with its token by compaction.
What a method needs from prefill attention beyond queries and keys it asks for
(`needs_column_sums`: each key's attention summed over the prompt's queries); methods that
weigh every prompt query themselves (A2SF's forgetting factor, Keyformer's noise, RoCo's
variance) read the prompt's attention logits a chunk of queries at a time (`prompt_logits`).

Besides the probabilities, `decode_scores` gets a `DecodeStep`: the layer, each query's
position, the prompt length its budget was set from (so the decode step: Keyformer's
temperature schedule), the position of the token in every slot, which slots the query sees,
and the budgets. A method returns new slot fields for every slot; the cache stores them only
for the slots the query saw. A recompute after preemption replays its generated tokens over a
cache that already holds all of them, so a later token must not age, or count a query, before
it existed (Scissorhands' history, RoCo's query counts, A2SF's decay).

What a method works out at one layer and reuses at a later layer of the same prompt (ChunkKV
reuses a layer's selection in the next ones) goes in `PrefillView.sequence_state`: one dict per
sequence, the same object at every layer of that sequence's prefill, empty at its first layer
and gone after the forward pass. A prefill step runs layer by layer over all of its sequences,
so state kept anywhere else would mix sequences.

A method that scores tokens by what the cache holds, not only by attention, asks for it: at
prefill `needs_values` fills `PrefillView.values` (VATP weighs attention by each value's L1
norm); at decode `decode_reads`, a subset of {"keys", "values", "queries"}, fills `DecodeStep.keys`
and `DecodeStep.values` [b, H, S, D] (R-KV's key redundancy), read from the pool in slot order (the
slots of the probabilities; garbage where not visible, as key_positions), and `DecodeStep.queries`
[b, Hq, D] (R-KV's attention logits), only when asked.

A method that reads what the prompt says (SepLLM keeps separator tokens) sets
`needs_vocabulary`: the engine then calls `bind_vocabulary(texts)` once, texts[i] the decoded
text of token id i (methods never import the tokenizer), and fills `PrefillView.token_ids` with
the id of the token in each cached slot.

A method whose budgets depend on layers it has not seen yet (CAKE's cascade: each new layer's
preference shrinks the budgets of the earlier ones) returns, after each layer's `keep_mask`,
masks for earlier layers of the same sequence from `earlier_keep_masks`: {layer: [H, P] bool}
over the P prompt tokens that layer holds now, in slot order (what its previous masks kept,
in order); the engine compacts those layers again, keeping the tokens a recompute generated,
and then sets the slot fields `earlier_prefill_state` returns for them (a budget that changed).
Such a method cannot be combined with quantization (quantized blocks are not compacted), and
its `kept_after_prefill` must plan for the most its layers hold at any point of the prefill.
What follows the compressed part of the prompt (a question after a compressed context, a
recompute's generated tokens) then runs in a second forward pass, over the cache as it ends.

A method that scores the prompt with extra passes of its own (KVzip makes the model repeat the
context) returns their token ids from `scoring_passes`. The engine feeds them in the same
forward pass as the prompt, each as if it came right after the prompt alone (its positions
follow the prompt's; at each layer it attends over the prompt and itself, not over the other
passes), and the method sees their queries and keys (`PrefillView.scoring_queries`,
`.scoring_keys`, one pass after the other, `.scoring_lengths`) besides the prompt's. Their KV
never stays in the cache, the next token is sampled from the prompt's last position, and
generation goes on at the position after the prompt. What follows the compressed part runs in
a second forward pass, so the passes never see it.

A method that folds what it evicts into what it keeps (CaM, D2O, KVMerger: Merger)
may change the K/V of kept slots as it evicts. At prefill, after `keep_mask`, `merge(view,
keep)` returns new contents [H, S(, D)] of slot fields ("k", "v", or its own) for the prompt's
slots, which the engine writes before it compacts, so only the kept slots' new contents stay.
At decode, once the engine has picked the victim of each head over budget, `merge_evicted`
gets those victims and returns new contents [b, H, S(, D)] of slot fields (reading the K/V it
merges through `decode_reads`); the engine writes them into the slots the query sees in the
heads that evict, then moves the last slot into the victim's place. A head that evicts several
in one step does so one victim at a time, each merge seeing the cache (fields, K/V) as the
previous one left it. A recompute replays its
decode steps, merges included, so a random merge draws from a hash of what it merges (seed,
layer, head, position: `hashed_uniform`), never from a generator. A weight or multiplicity
per merged token is a slot field; so is a value per (layer, head) that a method carries from
step to step (D2O's similarity threshold and layer budget), the same in every slot of the head
(a new token's slot starts at 0). A method whose layers hold different budgets while the
request generates returns each head's from `decode_budgets` (D2O). A merge that must keep how
much attention a slot draws (KeepKV: a slot standing for c tokens weighs c exp(q.k)) names a
float32 slot field in `attention_bias`: every attention over the cache, decode and prefill, adds
it to each slot's logit (log c; a new token's 0 is a plain slot), and the probabilities
`decode_scores` gets are those of the biased softmax.

A method that blends (CacheBlend: `blends`) prefills the compressed part twice (engine/blending.py):
first with each of its chunks (`chunk_lengths`) attending only over itself, as KV precomputed
chunk by chunk would be, then over that cache, recomputing every token up to `check_layer`; there
`recompute` picks, from each token's new K/V and its chunk-alone K/V, the tokens that go on, and
from then on only they are recomputed, overwriting their own slots. Nothing is evicted.

A method that decides from a profile of the model made ahead of time (DuoAttention's head
scores, HeadKV's retrieval heads, KVSharer's layer pairs) names it in `calibration`: the engine
loads the artifact `python -m nanokv.calibrate <calibration> --model ...` wrote for the loaded
model (or the file in the `calibration_file` option; nanokv/calibrate/ documents the format)
and hands it to `bind_calibration` before any request. A missing artifact, or one made for
another model or shape, is an error that names the command to run.

A method that shares whole layers (KVSharer) returns from `layer_sources` the layer whose KV
each layer reads: itself, or an earlier layer that keeps its own. The cache then gives a shared
layer no blocks at all; its queries attend over the source layer's cache, at prefill and decode.

A method that stores every token in fewer numbers (LoRC, Palu: methods/lowrank.py) sets
`stores_latents`: from its calibration it builds `latent_layers` (per layer, the bases a head
group's pre-RoPE keys and values are stored in) and `group`, and the engine then keeps a
LatentKVCache (nanokv/cache/latent_cache.py), whose tokens of layer l take as many slots as their
latents need; attention reads keys and values rebuilt from them. Nothing is evicted.

A method that thins keys (ThinK) sets `prunes_key_channels`: after a layer's keep_mask (and the
compaction), `key_channels(view, keep)` returns the kD channels [H, kD] each kv-head keeps
(`kept_channels(D)` of them), and the engine keeps a PrunedKVCache (nanokv/cache/pruned_cache.py):
the head's oldest kept tokens but the method's `recent` move into slim blocks holding those
channels of their keys; attention cuts the query to them for those tokens.

A method that merges layers in depth (MiniCache) returns from `layer_pairs` pairs of layers (a, b)
whose prompt is stored once: the engine then keeps a PairedKVCache (nanokv/cache/paired.py), and
at the end of prefill, right after layer b's attention, `merge_pair` gets both layers' prompt K/V
and returns what layer a stores and which tokens layer b keeps of its own; b's attention reads
a's merged slots restored with b's magnitudes together with its own.

A method that reads only part of the cache each decode step (PageReader) evicts nothing. Quest
ranks pages by their key bounds in the engine's kernels (`picks_by_bounds`). Any other reader
gets, at every decode layer from `skip_layers` on, a `ReadStep`: the query, what it reads of the
cache (every held key and its position, or each page's key bounds: read when first asked for), a
state dict per sequence that lives from step to step (TokenSelect's last query, Recycled
Attention's last full step), and one per step shared by the layers (TidalDecode's picks). It
returns `Picks`: per kv-head, the pages or the single slots to read, and the bytes its scoring
read. The engine attends over the picked pages through a reduced table, or over the picked slots
gathered into blocks of their own (cache.attend_slots), and counts the bytes of both
(kv_bytes_read_per_decode_token). A preemption's recompute runs its tokens densely, as prefill,
and starts the state afresh.

A method may also change how the prompt is prefilled (the runner: nanokv/engine/runner.py): in
chunks, each compressed with what the earlier ones left (`prefill_chunk`: InfiniPot, CItruS; the
view's `held_before`); with only some prompt tokens going on to later layers (`narrows` +
`propagate`: FastKV, LazyLLM); with a filter pass whose picks a second pass prefills alone at new
positions (`refill_layer` + `refill`: GemFilter); with its context's chunks prefilled alone and
then blended (`blends`: CacheBlend); or as chunks prefilled apart, each pruned by `significance` and
`prune` and merged pairwise up the layers of a `tree` (`merges_chunks`: HOMER).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from nanokv.cache.build import CacheRequest, HostTier


# the option of a method with a calibration: an explicit artifact instead of the cache's
CALIBRATION_FILE = (str, "", "a path to an artifact of python -m nanokv.calibrate (default: the nanokv cache)",
                    lambda v: True)


class RankHeads:
    """What a view offers a method that compares a layer's heads, under tensor parallelism
    (nanokv/distributed.py), where each rank holds H of the layer's H * ranks heads: rank r its
    heads r * H .. (r + 1) * H - 1. A method that ranks, averages or draws across heads asks for
    every head through these hooks, selects as on one process, and keeps its own heads' part; it
    never imports torch.distributed. `ranks` is the engine's group; None (one process): each hook is
    the identity. `head_axis`: where the heads sit in this view's tensors."""
    ranks = None
    head_axis = 0

    def all_heads(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """x holding a value per head of this rank along `dim` (default: head_axis) -> every head of the
        layer, in global order: an all-gather over the ranks (the score exchange), x itself on one."""
        return x if self.ranks is None else self.ranks.all_gather(x, self.head_axis if dim is None else dim)

    def own_heads(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """x over every head of the layer along `dim` -> this rank's heads (x itself on one process)."""
        return x if self.ranks is None else self.ranks.own(x, self.head_axis if dim is None else dim)

    def total_heads(self, n: int) -> int:
        """n heads a rank -> the layer's count over every rank (n on one process)."""
        return n if self.ranks is None else n * self.ranks.size

    def head_ids(self, n: int, device=None) -> torch.Tensor:
        """[n] int64: the global index of each of this rank's n heads (a hash or a draw by head)."""
        first = 0 if self.ranks is None else self.ranks.rank * n
        return torch.arange(first, first + n, device=device)


@dataclass
class PrefillView(RankHeads):
    """What a prefill-time method sees for one sequence at one layer."""
    layer: int
    num_layers: int
    queries: torch.Tensor    # [T, Hq, D] the prompt's queries at this layer (after RoPE)
    keys: torch.Tensor       # [H, S, D] the layer's cached keys in slot order (after RoPE)
    positions: torch.Tensor  # [S] position of each cached slot
    # [H, S] float32: attention each key received, summed over the prompt's queries and
    # averaged over the query heads of its group (only for methods with needs_column_sums)
    column_sums: torch.Tensor | None = None
    # this sequence's scratch space across the layers of its prefill (see the module docstring)
    sequence_state: dict = field(default_factory=dict)
    # [S] int64: the token id in each cached slot (only for methods with needs_vocabulary)
    token_ids: torch.Tensor | None = None
    # [H, S, D] the layer's cached values in slot order (only for methods with needs_values)
    values: torch.Tensor | None = None
    # (method, what its prefill_state returned for this view), once computed (Method.state_of)
    state: tuple | None = None
    # a method's scoring passes (scoring_passes), one after the other: queries [m, Hq, D], keys
    # [H, m, D], and the tokens of each pass (each at the positions after the prompt's)
    scoring_queries: torch.Tensor | None = None
    scoring_keys: torch.Tensor | None = None
    scoring_lengths: list[int] | None = None
    # a chunked prefill's (Method.prefill_chunk): the slots the layer held before this chunk, which
    # come first in `keys` (what earlier chunks left); the queries are the chunk's alone
    held_before: int = 0
    # tensor parallelism (nanokv/distributed.py): the ranks that hold the layer's other heads, which
    # the engine hands in; None on one process. Methods reach them only through RankHeads' hooks.
    ranks: object | None = None


@dataclass
class DecodeStep(RankHeads):
    """What a decode-time method sees besides the attention, for b sequences at one layer."""
    layer: int
    positions: torch.Tensor      # [b] the query's position
    prompt_lens: torch.Tensor    # [b] prompt tokens the budget was set from; the query is decode
                                 # step positions - prompt_lens + 1 (1: the first generated token)
    key_positions: torch.Tensor  # [b, H, S] position of the token in each slot (garbage where not visible)
    visible: torch.Tensor        # [b, H, S] bool: the slots this query attends to
    budgets: torch.Tensor        # [b] tokens each head of the sequence holds
    # [b, H, S, D] the cached keys / values in each slot, in the pool's dtype (only what the
    # method's decode_reads names; garbage where not visible)
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    queries: torch.Tensor | None = None  # [b, Hq, D] the query (after RoPE), if decode_reads names it
    # [b] int64: the id of the token this step feeds, whose slot is the one at `positions` (only for
    # methods with needs_vocabulary: FastGen marks a generated punctuation token)
    token_ids: torch.Tensor | None = None
    ranks: object | None = None  # tensor parallelism's group (RankHeads), None on one process
    head_axis = 1                # [b, H, S]: heads second


class ReadStep(RankHeads):
    """What a query-aware reader (PageReader.pick) sees for b sequences at one decode layer.
    Nothing is evicted after prefill, so slot j of a head holds the j-th token that head keeps,
    the same token at every later step (and, where prefill evicted nothing, at every layer).

    layer, num_layers; queries [b, Hq, D] (after RoPE); positions [b] the query's; lengths [b, H]
    the tokens each head holds, in slots 0 .. length - 1; block_size: tokens per page (page p holds
    slots p * block_size ..); itemsize: bytes of one stored number of a key; states: one dict per
    sequence, kept from decode step to decode step (and layer to layer) until it ends or is
    preempted (a reader's previous picks, its last query); step_state: shared by this step's layers
    for these same b sequences (TidalDecode reuses a layer's picks); inv_freq [D // 2]: the model's
    RoPE speeds, to undo RoPE (ReAttention); compress_lens: each sequence's leading tokens the
    method may treat apart, on the host: its prompt, or the context before its question
    (LLM.generate's (context, question) prompts), slots 0 .. n - 1 (Squeezed Attention's context).

    What the cache holds is read when a reader first asks for it (the engine's `fetch`), so a step
    that reuses earlier picks reads nothing: `keys` [b, H, S, D] every held key in slot order and
    `key_positions` [b, H, S] (S = pages * block_size, garbage past lengths); `bounds`, each page's
    smallest and largest key per channel, ([b, H, pages, D], [b, H, pages, D]).
    """

    def __init__(self, layer: int, num_layers: int, queries: torch.Tensor, positions: torch.Tensor,
                 lengths: torch.Tensor, block_size: int, itemsize: int, states: list[dict], step_state: dict,
                 keys: torch.Tensor | None = None, key_positions: torch.Tensor | None = None,
                 bounds: tuple | None = None, inv_freq: torch.Tensor | None = None, fetch=None,
                 pages: int | None = None, compress_lens: list[int] | None = None, ranks=None):
        self.ranks, self.head_axis = ranks, 1  # RankHeads: [b, H, ...] heads second
        self.layer, self.num_layers, self.queries, self.positions = layer, num_layers, queries, positions
        self.lengths, self.block_size, self.itemsize = lengths, block_size, itemsize
        self.states, self.step_state, self.inv_freq = states, step_state, inv_freq
        self.compress_lens = compress_lens
        self._held = {"keys": keys, "key_positions": key_positions, "bounds": bounds}
        self._fetch = fetch  # name -> {name: tensor, ...}: the engine's read of the cache
        # S: the slots of the heads' tables (pages of them: their width); a step built by hand holds them
        self.slots = pages * block_size if pages is not None else \
            keys.shape[2] if keys is not None else bounds[0].shape[2] * block_size

    def _read(self, name: str):
        if self._held[name] is None and self._fetch is not None:
            self._held.update(self._fetch(name))
        return self._held[name]

    keys = property(lambda self: self._read("keys"))
    key_positions = property(lambda self: self._read("key_positions"))
    bounds = property(lambda self: self._read("bounds"))

    def summary(self, name: str) -> torch.Tensor:
        """An Offloader's summary field `name` of every host slot [b, H, S, ...] (on the device)."""
        if name not in self._held:
            self._held[name] = None
        return self._read(name)

    def held(self) -> torch.Tensor:
        """[b, H, S] bool: the slots each head holds (S as keys)."""
        return torch.arange(self.slots, device=self.lengths.device) < self.lengths[..., None]

    def logits(self, keys: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """[b, H, group, S] float32 q . k / sqrt(D) of each query head over its kv-head's held keys
        (-inf where not held); `keys` [b, H, S, d] and `queries` [b, Hq, d] replace the step's (a
        reduced-dimension score: Loki, Double Sparsity; the scale stays the full head's)."""
        keys = self.keys if keys is None else keys
        queries = self.queries if queries is None else queries
        b, H = keys.shape[:2]
        q = queries.float().view(b, H, -1, queries.shape[-1])
        logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.float()) / math.sqrt(self.queries.shape[-1])
        return logits.masked_fill(~self.held()[:, :, None], float("-inf"))

    def key_bytes(self, channels: int | None = None) -> torch.Tensor:
        """Bytes of `channels` numbers (default: all of a key's) of every held key: what a score
        over the whole cache reads."""
        channels = self.queries.shape[-1] if channels is None else channels
        return self.lengths.sum() * (channels * self.itemsize)


@dataclass
class Picks:
    """A reader's choice for b sequences at one layer: `slots` or `pages` [b, H, k] per kv-head
    (held slot indices, or page indices slot // block_size), -1 where a head picks fewer than k."""
    slots: torch.Tensor | None = None
    pages: torch.Tensor | None = None
    scored_bytes: torch.Tensor | int = 0  # bytes of the cache the pick itself read (keys, bounds)
    # an Offloader's only: the picked slots' keys [b, H, k, D] as rebuilt on the device (then only
    # values and positions are recalled: ShadowKV), and a logit added to each pick [b, H, k] (a
    # sampling estimator's log(1 / probability of being sampled): MagicPIG)
    keys: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None


def tensor_bytes(value) -> int:
    """Bytes of every tensor in `value`, nested in dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def top_slots(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [b, H, S] (-inf: not a candidate) -> [b, H, min(k, S)] each head's k highest slots,
    -1 where a head has fewer than k candidates."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return top.indices.masked_fill(top.values == float("-inf"), -1)


def slot_mask(slots: torch.Tensor, width: int) -> torch.Tensor:
    """slots [..., k] (-1 or past the width: none) -> [..., width] bool, True at each slot given:
    top_slots' picks as a mask."""
    mask = torch.zeros(*slots.shape[:-1], width + 1, dtype=torch.bool, device=slots.device)
    return mask.scatter_(-1, torch.where((slots >= 0) & (slots < width), slots, width), True)[..., :width]


def scaled_windows(options: dict, budget: int | None, official_budget: int, windows: dict[str, int],
                   least: int = 0) -> dict:
    """A reader's fixed windows (sinks, local: their official sizes in `windows`) shrunk in proportion
    to a budget below the official one (to no fewer than `least`), unless the options give them: a
    small budget then keeps the official shares of sinks, local window and picks instead of being
    refused."""
    if budget is not None and budget < official_budget:
        for name, size in windows.items():
            options.setdefault(name, max(least, size * budget // official_budget))
    return options


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply, the 'lowbias32' constants): every input bit
    flips about half the output bits. Seeded draws that must not depend on the batch (Keyformer's
    noise, hashed_uniform) hash their coordinates with it."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_uniform(seed: int, *coordinates) -> torch.Tensor:
    """A uniform number in (0, 1), float32, per (seed, coordinates...): (layer, kv-head, position)
    for a random merge's draw, (layer, query position, query head, key position) for Keyformer's
    noise. The tensor coordinates broadcast together. The same token gets the same number whatever
    the batch, slot order or preemption (a random merge's draw: see the module docstring)."""
    device = next((p.device for p in coordinates if isinstance(p, torch.Tensor)), torch.device("cpu"))
    # a fill on the device, not a copy from the host (which waits for the GPU: no CUDA graph)
    h = hash32(torch.full((), seed & 0xFFFFFFFF, dtype=torch.int64, device=device))
    for part in coordinates:
        h = hash32(h ^ ((part.long() if isinstance(part, torch.Tensor) else part) & 0xFFFFFFFF))
    return ((h >> 9).float() + 0.5) / 2.0 ** 23                       # 23 bits, exact in float32


def query_logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[Hq, W, S] float32: the attention logits of queries [W, Hq, D] over keys [H, S, D], each group
    of query heads reading its kv-head."""
    H, S, D = keys.shape
    q = queries.float()
    k = keys.float().repeat_interleave(q.shape[1] // H, dim=0)    # [Hq, S, D]
    return torch.einsum("whd,hsd->hws", q, k) / math.sqrt(D)


def observation_attention(view: PrefillView, window: int, causal: bool = True) -> torch.Tensor:
    """[Hq, W, S] float32: softmax attention of the last `window` prompt queries over the cached
    keys, causal by position (what SnapKV-family and TOVA scores start from); causal=False lets
    each of them see every cached key, the later window queries' too (NACL's proxy scores)."""
    logits = query_logits(view.queries[-window:], view.keys)       # [Hq, W, S]
    if not causal:
        return logits.softmax(dim=-1)
    future = view.positions[None, None, :] > view.positions[-window:][None, :, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def head_value(field: torch.Tensor, step: DecodeStep) -> torch.Tensor:
    """A value per (layer, head) carried in every slot of a slot field [b, H, S] (D2O's and CAKE's
    layer budgets): read at the oldest slot the query sees -> [b, H]."""
    oldest = step.key_positions.masked_fill(~step.visible, torch.iinfo(step.key_positions.dtype).max)
    return field.gather(-1, oldest.argmin(dim=-1, keepdim=True))[..., 0]


def top_per_head(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[H, S] bool: each head's k highest scores."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)


def top_over_heads(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[H, S] bool: the k highest of all the heads' scores together, so heads keep different
    numbers of tokens (Ada-KV's layer-wide selection, KVzip's). Under tensor parallelism `scores`
    must be every rank's heads (PrefillView.all_heads), and k counts over all of them."""
    chosen = scores.flatten().topk(k).indices
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, chosen, True).view(scores.shape)


def prompt_logits(view: PrefillView, first: int = 0, chunk_bytes: int = 1 << 26):
    """Yield (start, logits [Hq, c, S] float32) for the prompt's queries first.. in chunks of c
    (about `chunk_bytes` each): each query's attention logits over the cached keys, -inf past its
    position. Query j of T sits at slot S - T + j. For scores that weigh every prompt query
    (softmax each chunk for its probabilities)."""
    H, S, D = view.keys.shape
    T, Hq = view.queries.shape[:2]
    keys = view.keys.float().repeat_interleave(Hq // H, dim=0)          # [Hq, S, D]
    rows = max(1, chunk_bytes // (4 * Hq * S))
    for start in range(first, T, rows):
        q = view.queries[start:start + rows].float()                     # [c, Hq, D]
        q_pos = view.positions[S - T + start:S - T + start + len(q)]
        logits = torch.einsum("chd,hsd->hcs", q, keys) / math.sqrt(D)
        yield start, logits.masked_fill(view.positions[None, None, :] > q_pos[None, :, None], float("-inf"))


def kept_share(compression: float, n: int) -> int:
    """ceil((1 - compression) n), compression read as the decimal it is written as (exact)."""
    return math.ceil((1 - Fraction(str(compression))) * n)


class Method:
    """What every method has: its name and options, the request's budget (compression or
    budget), and the storage it asks for (`cache_request`). On its own it compresses nothing
    (`full`, and the methods that only store differently: kivi, lorc, palu, minicache, kvsharer);
    the roles below add the rest."""
    name = "full"
    description = "no compression: every token is kept"
    paper = ""
    # option name -> (type, default, "valid range" text, check)
    options: dict = {}
    compression_hint = "choose a method to use compression or budget (see --list-methods)"
    calibration: str | None = None  # the nanokv.calibrate METHOD whose artifact bind_calibration gets
    calibration_file = ""           # the option of such methods: an explicit artifact (default: the cache)
    needs_vocabulary = False        # bind_vocabulary is called; PrefillView.token_ids is filled in
    trims_earlier_layers = False    # what follows the prompt waits for a second pass (cake, kvzip, minicache)
    prefill_chunk: int | None = None  # the prompt is prefilled this many tokens at a time, compressed after each
    narrows = False                 # propagate: only some prompt tokens go on to later layers (fastkv, lazyllm)
    refill_layer: int | None = None  # refill: a filter pass to here picks the tokens a second pass prefills (gemfilter)
    blends = False                  # chunks prefilled alone, then some tokens recomputed over them (cacheblend)
    merges_chunks = False           # chunks prefilled apart, pruned and merged pairwise up the layers (homer)
    # why it cannot split its heads across tensor-parallel ranks (nanokv/distributed.py); None: it can
    tensor_parallel_reason: str | None = None
    check_layer = 1                 # blends: the layer whose K/V deviations pick the tokens recomputed
    # storage (cache_request)
    quantization = None             # a Codec (cache/codec.py): older K and V stored encoded (kivi, int4, gear)
    quantizes = False               # quantization is all it does: it follows an evictor (snapkv+kivi)
    stores_latents = False          # tokens stored as low-rank latents in latent_layers (lorc, palu)
    prunes_key_channels = False     # key_channels picks what older keys keep (think)
    slot_fields: dict[str, torch.dtype] = {}  # per-token state the cache carries
    # a float32 slot field every attention over this cache adds to each slot's logit (KeepKV's log
    # vote counts: a slot standing for c merged tokens weighs c times); None: plain attention
    attention_bias: str | None = None
    # the roles a method plays, set by the role classes below (never by a method itself)
    selects_tokens = False          # PrefillSelector: keep_mask at the end of each layer's prefill
    evicts_during_decode = False    # DecodeEvictor: decode_scores every decode step
    merges = False                  # Merger: merge / merge_evicted change the K/V of kept slots
    selects_pages = False           # PageReader: pages_to_read sets how many blocks each decode step reads
    offloads = False                # Offloader: older tokens live in host memory, recalled when picked
    sparse_prefill = False          # SparsePrefill: a fresh prompt's attention runs in the tiles it picks

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        if budget is not None:
            if not isinstance(budget, int) or budget <= 0:
                raise ValueError(f"budget must be a positive number of tokens, got {budget!r}")
            if compression:
                raise ValueError("give either compression or budget, not both")
        if not (isinstance(compression, (int, float)) and 0 <= compression < 1):
            raise ValueError(f"compression must be in [0, 1) (the fraction of tokens removed), got {compression!r}")
        self.compression, self.budget = float(compression), budget
        takes_budget = (self.selects_tokens or self.selects_pages or self.sparse_prefill or self.stores_latents
                        or self.merges_chunks)
        if not takes_budget and type(self).layer_sources is Method.layer_sources and \
                type(self).layer_pairs is Method.layer_pairs and (compression or budget is not None):
            raise ValueError(f"method {self.name!r} does not compress; {self.compression_hint}")
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise ValueError(f"unknown option {sorted(unknown)[0]!r} for method {self.name!r}; valid: {valid}")
        for key, (kind, default, valid_range, check) in self.options.items():
            value = options.get(key, default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, str) and kind is bool:  # from the command line
                value = {"true": True, "1": True, "false": False, "0": False}.get(value.lower(), value)
            elif isinstance(value, str) and kind is not str:
                try:
                    value = kind(value)
                except ValueError:
                    raise ValueError(f"option {key}={value!r} of method {self.name!r} must be "
                                     f"{kind.__name__}, {valid_range}") from None
            if not isinstance(value, kind) or not check(value):
                raise ValueError(f"option {key}={value!r} of method {self.name!r} must be {valid_range}")
            setattr(self, key, value)
        self.check_budget()

    @property
    def compresses(self) -> bool:
        return self.compression > 0 or self.budget is not None

    def check_budget(self):
        """Methods with a minimum (a window, sinks) refuse budgets below it."""

    def settings_key(self) -> str:
        """The method and every setting that shapes what it keeps (its name, budget and options): what a
        compressed prompt is cached under (engine/prefix_sharing.py)."""
        options = ",".join(f"{k}={getattr(self, k)!r}" for k in sorted(self.options))
        return f"{self.name}|compression={self.compression!r}|budget={self.budget!r}|{options}"

    def tokens_to_keep(self, n: int) -> int:
        """`budget`, or ceil((1 - r) n) for compression=r, none over n. r is taken as the decimal it
        is written as, so (1 - 0.7) x 10 keeps 3, not the 4 the float product 3.0000000000000004
        rounds up to. As l2compress; kvpress keeps int(n (1 - r)), one fewer when that is fractional."""
        keep = self.budget if self.budget is not None else kept_share(self.compression, n)
        return min(n, keep)

    def applies_to(self, layer: int) -> bool:
        return True

    def layer_budget(self, n: int, layer: int, num_layers: int) -> int:
        """Tokens layer `layer` keeps per head; uneven allocations (PyramidKV) override this,
        keeping the request's total."""
        return self.tokens_to_keep(n)

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """Tokens a head of layer `layer` holds (on average over the layer's heads) once a prompt
        of n tokens is compressed: what the scheduler plans the memory of a prefill with."""
        if not self.compresses or not self.applies_to(layer):
            return n
        return min(n, self.layer_budget(n, layer, num_layers))

    def scoring_passes(self, prompt_ids: list[int], encode, reply_prefix: str) -> list[list[int]]:
        """Token ids of each extra pass fed after the prompt's compressed part `prompt_ids` to
        score it (see the module docstring); none by default. encode(text) -> ids (no BOS);
        reply_prefix: the text that opens the assistant's reply after a user turn."""
        return []

    def chunk_lengths(self, ids: list[int]) -> list[int]:
        """blends: the lengths of the chunks the compressed part `ids` is prefilled in, each alone."""
        return [len(ids)]

    def recompute(self, new: dict[str, torch.Tensor], cached: dict[str, torch.Tensor]) -> torch.Tensor:
        """blends: {"k", "v": [H, T, D]} each token's K/V recomputed at check_layer, and its chunk-alone
        K/V -> [T] bool: the tokens recomputed from there on."""
        raise NotImplementedError

    def tree(self, n: int, num_layers: int):
        """merges_chunks: the plan of a compressed part of n tokens (methods/homer.py: MergeTree): its
        chunks, the last layer of each tree level, and each node's length after its pruning."""
        raise NotImplementedError

    def significance(self, last_row_probs: torch.Tensor) -> torch.Tensor:
        """merges_chunks: [Hq, S] a chunk's last token's attention probabilities at a pruning layer ->
        [S] how much each of the chunk's tokens matters."""
        raise NotImplementedError

    def prune(self, significance: torch.Tensor, prunable: torch.Tensor, target: int) -> torch.Tensor:
        """merges_chunks: [S] significance, [S] bool (the tokens it may drop) -> [S] bool: what the chunk
        keeps to be `target` long."""
        raise NotImplementedError

    def bind_vocabulary(self, texts: list[str]):
        """texts[i]: the decoded text of token id i (for methods with needs_vocabulary)."""

    def layer_pairs(self, num_layers: int) -> list[tuple[int, int]] | None:
        """Pairs of layers (a, b) whose prompt KV is merged in depth (MiniCache): a keeps every
        token, b only those merge_pair leaves it (nanokv/cache/paired.py). None: no pairs."""
        return None

    def layer_sources(self, num_layers: int) -> list[int] | None:
        """For each layer, the layer whose KV it reads (KVSharer): itself, or an earlier layer whose
        cache it shares and then holds none of its own. None: every layer its own."""
        return None

    def bind_calibration(self, artifact: dict):
        """The artifact of `python -m nanokv.calibrate <calibration>` made for the loaded model
        (methods with a calibration; see the module docstring)."""

    # --- storage of its own (stores_latents, prunes_key_channels, layer_pairs) ---------------

    latent_layers: list | None = None  # stores_latents: per layer, the bases (cache/latent_cache.LatentLayer)
    group = 1                          # stores_latents: kv-heads sharing one basis
    recent = 0                         # prunes_key_channels: the newest tokens that keep every channel

    def kept_channels(self, head_dim: int) -> int:
        """prunes_key_channels: how many key channels (kD) the older tokens keep."""
        raise NotImplementedError

    def key_channels(self, view: PrefillView, keep: torch.Tensor | None) -> torch.Tensor:
        """prunes_key_channels: after keep_mask (keep [H, S] or None), the kD channels [H, kD] each
        kv-head's older keys keep."""
        raise NotImplementedError

    def merge_pair(self, keys_a: torch.Tensor, values_a: torch.Tensor, keys_b: torch.Tensor,
                   values_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """layer_pairs: the prompt K/V [H, n, D] of layers a and b -> what the cache stores: "k", "v"
        (layer a's new contents), "k_mag_b", "v_mag_b" (b's magnitudes, 0 where b keeps its own) and
        "keep" [H, n] bool (the tokens b keeps of its own) (nanokv/cache/paired.py)."""
        raise NotImplementedError

    # --- the storage request: what the engine builds the cache from -------------------------

    def cache_request(self, num_layers: int, head_dim: int) -> CacheRequest:
        """The block kind, fields and layer layout this method needs (nanokv/cache/build.py)."""
        return CacheRequest(quantization=self.quantization,
                            latent_layers=self.latent_layers if self.stores_latents and self.compresses else None,
                            group=self.group,
                            key_channels=self.kept_channels(head_dim) if self.prunes_key_channels else None,
                            pairs=self.layer_pairs(num_layers), sources=self.layer_sources(num_layers),
                            slot_fields=self.slot_fields,
                            # page bounds: for readers that rank pages by them (Quest) or read them
                            key_bounds=self.selects_pages and not self.offloads and
                            (self.picks_by_bounds or self.reads_bounds),
                            host_tier=self.host_tier(head_dim) if self.offloads else None)


class PrefillSelector(Method):
    """Role: at the end of a prefill, right after each layer's attention, pick what the layer's
    prompt keeps (`keep_mask`; by default each head's top `layer_budget` of `scores`)."""
    selects_tokens = True
    needs_column_sums = False       # PrefillView.column_sums is filled in
    needs_values = False            # PrefillView.values is filled in

    def scores(self, view: PrefillView) -> torch.Tensor:
        """[H, S] importance of each cached token per kv-head: the highest are kept."""
        raise NotImplementedError

    def keep_mask(self, view: PrefillView) -> torch.Tensor | None:
        """[H, S] bool, or None to keep everything."""
        S = view.keys.shape[1]
        k = min(S, self.layer_budget(S, view.layer, view.num_layers))
        if k >= S or not self.applies_to(view.layer):
            return None
        return top_per_head(self.scores(view), k)

    def earlier_keep_masks(self, view: PrefillView) -> dict[int, torch.Tensor]:
        """After keep_mask at view.layer: {earlier layer: [H, P] bool} over the P prompt tokens
        that layer holds now, in slot order; the engine compacts them (trims_earlier_layers)."""
        return {}

    def earlier_prefill_state(self, view: PrefillView) -> dict[int, dict[str, torch.Tensor]]:
        """After earlier_keep_masks: {earlier layer: {slot field: [H, P]}} over the P prompt tokens
        that layer holds now, to set again (CAKE: a layer's decode budget, final only once the
        cascade has seen the last layer)."""
        return {}

    def propagate(self, view: PrefillView) -> torch.Tensor | None:
        """[T] bool over the view's queries (the prompt's, at this layer): the tokens whose hidden
        states go on to the next layer (the last one always does); None: all of them."""
        return None

    def refill(self, view: PrefillView) -> torch.Tensor:
        """At `refill_layer`: [T] bool over the prompt's tokens, those the second pass prefills."""
        raise NotImplementedError

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """Initial value [H, S] of each slot field for the prompt's tokens."""
        return {}

    def state_of(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """prefill_state(view), computed once per view: the engine stores it as slot fields, and
        a decode-time method's prefill `scores` usually start from it."""
        if view.state is None or view.state[0] is not self:
            view.state = (self, self.prefill_state(view))
        return view.state[1]


class DecodeEvictor(PrefillSelector):
    """Role: hold every (layer, head) at the request's budget while it generates: each decode step
    the engine asks `decode_scores` and evicts the lowest-scoring slots of each head over budget."""
    evicts_during_decode = True
    decode_reads: frozenset[str] = frozenset()  # of {"keys", "values", "queries"}: DecodeStep fills those in
    # decode_budgets reads the slot fields or the step's positions: how many each head evicts is then
    # counted on the device (the engine otherwise knows it on the host, from the lengths and budgets)
    budgets_from_state = False

    def protect_recent(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [H, S] with the newest recent_window(decode budget) slots set to +inf: at prefill
        a decode-time method keeps the window its decode never evicts."""
        S = scores.shape[1]
        recent = int(self.recent_window(torch.tensor(self.decode_budget(S), device=scores.device)))
        scores[:, S - recent:] = float("inf")
        return scores

    def decode_budget(self, prompt_len: int) -> int:
        """Tokens each (layer, head) holds while the request generates: `budget`, or the share
        of the prompt that `compression` keeps."""
        return self.budget if self.budget is not None else kept_share(self.compression, prompt_len)

    def decode_budgets(self, state: dict[str, torch.Tensor], step: DecodeStep) -> torch.Tensor:
        """[b, H] tokens each head holds while the request generates (state: the slot fields after
        this step's decode_scores): the request's budget in every head, unless a method's layers
        hold budgets of their own (D2O) or let the cache grow between cuts (R-KV's divide_length);
        a head over it by n evicts n slots this step."""
        return step.budgets[:, None].expand(step.visible.shape[:2])

    def recent_window(self, budget: torch.Tensor) -> torch.Tensor:
        """How many of the newest positions are never evicted, per request's budget."""
        return torch.zeros_like(budget)

    def decode_scores(self, probs: torch.Tensor, state: dict[str, torch.Tensor], step: DecodeStep):
        """probs: [B, H, group, S] float32, the current query heads' attention over each kv-head's
        slots (0 past a head's length and at slots it does not see); state: slot fields [B, H, S];
        step: the layer, positions and budgets (DecodeStep).
        -> (scores [B, H, S], the lowest is evicted; updated slot fields, kept where step.visible)."""
        raise NotImplementedError


class Merger(PrefillSelector):
    """Role: fold what is evicted into the K/V of what stays (at prefill `merge`; a decode evictor
    that merges also `merge_evicted`)."""
    merges = True

    def merge(self, view: PrefillView, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """After keep_mask (keep [H, S]): new contents [H, S(, D)] of slot fields ("k", "v", a
        method's own) for the prompt's slots; only the kept slots' survive the compaction."""
        return {}

    def merge_evicted(self, victim: torch.Tensor, evicting: torch.Tensor, state: dict[str, torch.Tensor],
                      step: DecodeStep) -> dict[str, torch.Tensor]:
        """victim [b, H]: the slot each head drops now, where evicting [b, H] (called once per victim
        when a head drops several in a step); state: the slot fields after decode_scores.
        -> new contents [b, H, S(, D)] of slot fields, written where step.visible in the evicting
        heads before the victim's slot is reused."""
        return {}


class PageReader(Method):
    """Role: evict nothing, and pick the pages (blocks) or the tokens each decode step reads
    (Quest, TidalDecode, Loki, ...). Quest's rule runs in the engine's page-bound kernels
    (`picks_by_bounds`); every other reader picks in `pick`, from what its ReadStep reads."""
    selects_pages = True

    skip_layers = 0          # the first layers, whose decode reads every page
    picks_by_bounds = False  # Quest: the engine picks pages_to_read pages by their key bounds
    reads_bounds = False     # ReadStep.bounds: the pool keeps each page's key bounds (a cost only then)
    default_budget = 1024    # tokens each kv-head reads a decode step when no --budget is given

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        if compression:
            raise ValueError(f"{self.name} keeps the whole cache and reads a token budget: give --budget (tokens "
                             f"read per head and step, e.g. 256), not --compression={compression!r}")
        super().__init__(0.0, self.default_budget if budget is None else budget, **options)

    @property
    def compresses(self) -> bool:
        return False  # nothing is evicted

    def pages_to_read(self, block_size: int) -> int:
        """Pages each head reads a decode step by Quest's rule (the highest upper bounds on the
        query's attention logit, the newest page always: kernels.reference.quest_pages)."""
        raise NotImplementedError

    def pick(self, step: ReadStep) -> Picks:
        """What each head of b sequences reads at one decode layer (layers >= skip_layers)."""
        raise NotImplementedError


@dataclass
class OffloadView:
    """The tokens one sequence moves to the host tier at one layer, oldest first: keys and values
    [H, n, D] (keys after RoPE), positions [n]; `state`: the sequence's reader state, which `pick`
    sees as `ReadStep.states` (a prefill, a recompute's too, starts it afresh); `inv_freq` [D // 2]:
    the model's RoPE speeds (to undo RoPE: ShadowKV's pre-RoPE keys); `token_ids` [n]: their ids,
    for a method with needs_vocabulary (SentenceKV's sentences), else None; `queries` [n, Hq, D]: at
    prefill, the moved tokens' own queries (after RoPE: RetrievalAttention links them to keys); None
    for a block moved at decode."""
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    state: dict
    inv_freq: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    queries: torch.Tensor | None = None


class Offloader(PageReader):
    """Role: keep every token, most of them in host memory, and recall what each decode step reads
    (ShadowKV, ArkVale, ClusterKV, ...). From `skip_layers` on, each head keeps its newest
    `device_window` tokens on the device, read whole every step; the rest move to the host tier as
    each layer's prefill ends and as decode fills a block (nanokv/cache/host_tier.py).

    When tokens move, `summarize` sees them (an `OffloadView`) and returns what stays on the device for each of
    them (`summary_fields`: a low-rank key, hash codes, a cluster id), and may build a per-sequence
    index in `state` (the ReadStep's state of that sequence: a basis, centroids). Each decode step
    `pick` reads those (`ReadStep.summary(name)`, and with `summary_bounds` the host pages' key
    bounds as `ReadStep.bounds`; `ReadStep.keys` are the host's keys, read in host memory: a search
    on the CPU) and returns the host slots or pages to recall; `lengths` and `slots` of the step are
    the host tier's. The engine recalls them and attends over them and the device window in one
    softmax. `Picks.keys` replaces the recalled keys with keys rebuilt on the device (only values
    move), `Picks.log_weights` weighs each pick (a sampling estimator).
    """
    offloads = True
    device_window = 64       # the newest tokens of each head kept, and read whole, on the device
    summary_bounds = False   # the host pages' key bounds stay on the device (ReadStep.bounds)

    def summary_fields(self, head_dim: int) -> dict[str, tuple[torch.dtype, tuple]]:
        """{name: (dtype, shape per token)} of what each host token keeps on the device."""
        return {}

    def summarize(self, view: "OffloadView") -> dict[str, torch.Tensor]:
        """Tokens moving to the host at one layer of one sequence (a prompt's first, then a block at
        a time) -> their summary fields {name: [H, n, ...]}."""
        return {}

    def state_bytes(self, state: dict) -> int:
        """Device bytes of a sequence's index in `state` (a basis, centroids, sentence vectors),
        which the cache counts with the sequence's (by default: every tensor in it, nested in dicts,
        lists and tuples; a method that keeps some in host memory says so)."""
        return tensor_bytes(state)

    def host_tier(self, head_dim: int) -> HostTier:
        return HostTier(self.device_window, self.skip_layers, self.summary_fields(head_dim), self.summary_bounds)

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        return n if layer < self.skip_layers else min(n, self.device_window)


@dataclass
class SparsePrefillView:
    """What a sparse-prefill method sees of one sequence's prompt at one layer: queries [T, Hq, D] and
    keys [T, H, D] (after RoPE), positions [T] (the prompt's own, from 0), and the sequence's
    scratch space across the layers of this prefill (CritiPrefill fuses a layer's scores into the
    next one's), as PrefillView.sequence_state."""
    layer: int
    num_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    positions: torch.Tensor
    sequence_state: dict = field(default_factory=dict)


class SparsePrefill(Method):
    """Role: keep the whole cache, and compute a prompt's attention only in some tiles (MInference,
    CritiPrefill). The prompt's T tokens cut into tiles of `tile_size`; at each layer of a prefill
    the sequence holds alone (no cached prefix, no sliding window), `prefill_blocks` returns which
    (query tile, key tile) pairs each query head computes, and the engine runs the block-sparse
    kernel (kernels.sparse_prefill) over those; None: the layer runs dense. Anything else (a chunk
    over a cached prefix, a recompute's generated tokens after its prompt) and every decode step
    attend densely, as `full`. The engine counts the FLOPs of the tiles computed (LLM.stats:
    prefill_attention_flops, against prefill_attention_flops_dense)."""
    sparse_prefill = True
    tile_size = 64           # tokens per tile, queries and keys alike (MInference's kernels' 64)
    default_budget = 4096    # what --budget means is the method's (tokens per query row or segment)

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        if compression:
            raise ValueError(f"{self.name} keeps the whole cache and sparsifies the prompt's attention: give "
                             f"--budget (e.g. {self.default_budget}), not --compression={compression!r}")
        super().__init__(0.0, self.default_budget if budget is None else budget, **options)

    @property
    def compresses(self) -> bool:
        return False  # nothing is evicted

    def prefill_blocks(self, view: SparsePrefillView) -> torch.Tensor | None:
        """[Hq, nq, nk] bool (nq = nk = ceil(T / tile_size)): the tiles each query head computes;
        None: this layer runs dense."""
        raise NotImplementedError

    def tile_mask(self, view: SparsePrefillView) -> torch.Tensor | None:
        """prefill_blocks with the diagonal tiles always kept (every query sees itself) and the
        tiles above it dropped (the causal triangle computes nothing there)."""
        blocks = self.prefill_blocks(view)
        if blocks is None:
            return None
        n = blocks.shape[-1]
        lower = torch.ones(n, n, dtype=torch.bool, device=blocks.device).tril()
        return (blocks | torch.eye(n, dtype=torch.bool, device=blocks.device)) & lower
