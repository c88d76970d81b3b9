"""What nanokv's methods keep against what NVIDIA kvpress keeps, on SmolLM2 in float32.

kvpress pins transformers < 5.3, so it runs in a virtual environment of its own:

    python3.11 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf jinja2
    PYTHONPATH=. /tmp/kvenv/bin/python scripts/kvpress_parity.py

For each method: the same ~1,000-token prompt, compression 0.5, kvpress's settings on both
sides; the kept positions per (layer, kv-head) are compared and the share of kept slots the
two agree on is printed, with the largest difference between the two engines' logits for
one more token fed after the compressed prefill. transformers loads the same GGUF file.
kvpress's presses act once, after prefill: for h2o and tova this compares the prefill half
(decode-time eviction is checked against a plain statement of each method in
tests/test_methods.py). kvpress's AdaKVPress masks keys instead of evicting them: its kept set
is what it leaves unmasked. ChunkKVPress and SimLayerKVPress have no scores of their own: their
kept set is read from the keys their compress returns. SimLayerKVPress takes no ratio: a lazy
layer keeps n_initial + n_recent - n_last tokens, nanokv's budget; its threshold is one where
SmolLM2 has lazy layers and layers that are not.
"""

import argparse

import torch
import transformers
from kvpress import (AdaKVPress, ChunkKVPress, KnormPress, ObservedAttentionPress, PyramidKVPress,
                     SimLayerKVPress, SnapKVPress, StreamingLLMPress, TOVAPress)
from kvpress.utils import compute_n_kept

from kernels.reference import gather_blocks
from nanokv import LLM, SamplingParams
from nanokv.hub import resolve_model

SNAPKV_AT_KVPRESS = {"window_size": 64, "kernel_size": 5, "pooling": "avg"}  # SnapKVPress's defaults

# nanokv method -> (kvpress press at ratio r, nanokv options that match kvpress's settings)
PAIRS = {
    "knorm": (lambda r: KnormPress(compression_ratio=r), {"skip_layers": 0}),
    "streaming_llm": (lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4), {"sink_tokens": 4}),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5), SNAPKV_AT_KVPRESS),
    "tova": (lambda r: TOVAPress(compression_ratio=r), {}),
    "h2o": (lambda r: ObservedAttentionPress(compression_ratio=r), {"recent_ratio": 0, "normalize": True}),
    "pyramidkv": (lambda r: PyramidKVPress(compression_ratio=r, window_size=64, kernel_size=5, beta=20),
                  {**SNAPKV_AT_KVPRESS, "beta": 20, "schedule": "kvpress"}),
    "adakv": (lambda r: AdaKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5), alpha_safeguard=0.2),
              {**SNAPKV_AT_KVPRESS, "alpha_safeguard": 0.2}),
    "chunkkv": (lambda r: ChunkKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5), chunk_length=20),
                {**SNAPKV_AT_KVPRESS, "chunk_length": 20, "reuse_layers": 1}),
    "simlayerkv": (lambda r: SimLayerKVPress(lazy_threshold=0.9, n_recent=500, n_initial=4, n_last=1),
                   {"threshold": 0.9, "sink_tokens": 4, "criterion": "kvpress"}),
}
# nanokv's budget where the press does not follow the ratio: what a lazy layer keeps
BUDGETS = {"simlayerkv": lambda press: press.n_initial + press.n_recent - press.n_last}
NEEDS_EAGER = {"h2o"}  # ObservedAttentionPress reads the attention weights only eager attention returns

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined a screw press with movable metal type. Within decades, presses spread across Europe, "
        "books became cheaper, and literacy rose. ")


def kvpress_kept_by_compress(model, ids, press):
    """{layer: per kv-head, the set of positions} of the keys the press's compress returns
    (each one found among the keys it was given)."""
    kept, original = {}, type(press).compress

    def recording_compress(self, module, hidden_states, keys, values, *args, **kwargs):
        out_keys, out_values = original(self, module, hidden_states, keys, values, *args, **kwargs)
        distance = torch.cdist(out_keys[0].float(), keys[0].float(),   # [H, kept, S], exact
                               compute_mode="donot_use_mm_for_euclid_dist")
        assert bool((distance.min(dim=-1).values == 0).all()), "a returned key is not one of the prompt's"
        kept[module.layer_idx] = [set(row.tolist()) for row in distance.argmin(dim=-1)]
        return out_keys, out_values

    type(press).compress = recording_compress
    try:
        with torch.no_grad(), press(model):
            model(torch.tensor([ids]), past_key_values=transformers.DynamicCache())
    finally:
        type(press).compress = original
    return kept


def kvpress_kept(model, ids, press, ratio):
    """{layer: per kv-head, the set of positions kvpress keeps}: its own scores and top-k
    (PyramidKVPress: its own layer budget), or what AdaKVPress leaves unmasked."""
    if isinstance(press, (ChunkKVPress, SimLayerKVPress)):
        return kvpress_kept_by_compress(model, ids, press)
    scores, modules = {}, {}
    scorer = press.press if isinstance(press, AdaKVPress) else press
    original = type(scorer).score

    def recording_score(self, module, *args, **kwargs):
        s = original(self, module, *args, **kwargs)
        scores[module.layer_idx], modules[module.layer_idx] = s[0].detach().clone(), module
        return s

    type(scorer).score = recording_score
    try:
        with torch.no_grad(), press(model):
            model(torch.tensor([ids]), past_key_values=transformers.DynamicCache())
    finally:
        type(scorer).score = original
    kept = {}
    for layer, s in scores.items():
        if isinstance(press, AdaKVPress):
            _, heads, slots = modules[layer].masked_key_indices
            mask = torch.ones_like(s, dtype=torch.bool)
            mask[heads, slots] = False
            kept[layer] = [set(torch.nonzero(row).flatten().tolist()) for row in mask]
            continue
        n_kept = (press.get_layer_budget(modules[layer], len(ids)) if isinstance(press, PyramidKVPress)
                  else compute_n_kept(len(ids), ratio))
        kept[layer] = [set(row.tolist()) for row in s.topk(n_kept, dim=-1).indices]
    return kept


@torch.no_grad()
def kvpress_next_logits(model, ids, press, token):
    """Logits for `token`, fed after the pressed prefill (at position len(ids))."""
    cache = transformers.DynamicCache()
    with press(model):
        model(torch.tensor([ids]), past_key_values=cache)
    n = len(ids)
    out = model(torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[n]]),
                cache_position=torch.tensor([n]))
    return out.logits[0, -1].float()


@torch.inference_mode()  # as the engine runs: its scratch buffers are inference tensors
def nanokv_next_logits(llm, ids, token):
    """The same through nanokv's model and cache: the method compresses during the prefill."""
    from nanokv.cache import CacheAttention

    cache = llm.cache
    cache.add(-1)
    try:
        positions = torch.arange(len(ids))
        llm.model(torch.tensor(ids), positions, CacheAttention(cache, [-1], [len(ids)], positions, llm.method))
        step = torch.tensor([len(ids)])
        hidden = llm.model(torch.tensor([token]), step, CacheAttention(cache, [-1], [1], step))
        return llm.model.compute_logits(hidden)[0]
    finally:
        cache.free(-1)


def nanokv_kept(path, ids, method, budget, options):
    """{layer: per kv-head, the set of positions} nanokv's cache holds after the prefill."""
    llm = LLM(str(path), dtype="float32", method=method, budget=budget, **options)
    held = {}
    finish = llm.scheduler.finish

    def capture(seq):  # max_tokens=1: the cache holds the compressed prompt only
        s = llm.cache.seqs[seq.id]
        for layer in range(llm.config.num_layers):
            pos = gather_blocks(llm.cache.pool.pos, s.tables[layer, :, :int(s.num_blocks[layer].max())])
            held[layer] = [set(row[:n].tolist()) for row, n in zip(pos, s.lengths[layer].tolist())]
        finish(seq)

    llm.scheduler.finish = capture
    llm.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    return held, llm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument("--methods", nargs="*", default=list(PAIRS))
    args = parser.parse_args()
    path = resolve_model("smollm2-135m").path
    models = {attn: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation=attn).eval()
        for attn in ("sdpa", "eager")}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer((TEXT * 40))["input_ids"][:args.tokens]
    budget = compute_n_kept(len(ids), args.compression)
    for method in args.methods:
        make_press, options = PAIRS[method]
        model = models["eager" if method in NEEDS_EAGER else "sdpa"]
        press = make_press(args.compression)
        theirs = kvpress_kept(model, ids, press, args.compression)
        ours, llm = nanokv_kept(path, ids, method, BUDGETS.get(method, lambda _: budget)(press), options)
        agree = sum(len(t & o) for layer, heads in theirs.items() for t, o in zip(heads, ours[layer]))
        total = sum(len(t) for heads in theirs.values() for t in heads)
        token = ids[len(ids) // 2]  # any token will do as the next one
        diff = (kvpress_next_logits(model, ids, make_press(args.compression), token)
                - nanokv_next_logits(llm, ids, token)).abs().max().item()
        print(f"{method:14} kept slots agreeing with kvpress: {100 * agree / total:.2f}% "
              f"({agree}/{total}, {len(theirs)} layers, {len(ids)} tokens, keep {total // (len(theirs) * len(theirs[0]))}"
              f" a head on average); "
              f"next-token logits max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
