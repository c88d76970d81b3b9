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
`--methods think` compares the key channels each (layer, kv-head) keeps with ThinKPress's
(key_channel_compression_ratio 0.4, window 32; kvpress zeroes the pruned channels of every
prompt key, so nanokv runs with recent=0 and no eviction), and the next-token logits.
`--methods duoattention` compares head scores first: kvpress's on-the-fly DuoAttention scoring
over nanokv's calibration texts (in place of its BookSum sample) against `nanokv.calibrate`'s on
the same token ids; then the heads each streams at the head_compression_ratio that compression
gives nanokv, and the kept slots.
"""

import argparse
from pathlib import Path

import torch
import transformers
from kvpress import (AdaKVPress, ChunkKVPress, KnormPress, KVzipPress, ObservedAttentionPress, PyramidKVPress,
                     SimLayerKVPress, SnapKVPress, StreamingLLMPress, TOVAPress)
from kvpress.presses import kvzip_press
from kvpress.utils import compute_n_kept

from nanokv.kernels.reference import gather_blocks
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
    "kvzip": (lambda r: KVzipPress(compression_ratio=r), {}),
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


def kvpress_kept_by_mask(model, ids, press, cache=None):
    """{layer: per kv-head, the set of positions} KVzipPress leaves unmasked. It reads the
    tokenizer by the model's name: given the one loaded here, without its chat template, so
    the reconstruction request ends with a newline as nanokv's does for token ids."""
    class Tokenizers:
        @staticmethod
        def from_pretrained(_):
            return TOKENIZER

    original, kvzip_press.AutoTokenizer = kvzip_press.AutoTokenizer, Tokenizers
    try:
        with torch.no_grad(), press(model):
            model(input_ids=torch.tensor([ids]), past_key_values=transformers.DynamicCache() if cache is None else cache)
    finally:
        kvzip_press.AutoTokenizer = original
    kept = {}
    for layer, decoder_layer in enumerate(model.model.layers):
        _, heads, slots = decoder_layer.self_attn.masked_key_indices
        mask = torch.ones(model.config.num_key_value_heads, len(ids), dtype=torch.bool)
        mask[heads, slots] = False
        kept[layer] = [set(torch.nonzero(row).flatten().tolist()) for row in mask]
    return kept


def kvpress_kept(model, ids, press, ratio):
    """{layer: per kv-head, the set of positions kvpress keeps}: its own scores and top-k
    (PyramidKVPress: its own layer budget), or what AdaKVPress leaves unmasked."""
    if isinstance(press, (ChunkKVPress, SimLayerKVPress)):
        return kvpress_kept_by_compress(model, ids, press)
    if isinstance(press, KVzipPress):
        return kvpress_kept_by_mask(model, ids, press)
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
    if isinstance(press, KVzipPress):  # its masks stay on the modules for the next token
        kvpress_kept_by_mask(model, ids, press, cache)
    else:
        with press(model):
            model(torch.tensor([ids]), past_key_values=cache)
    n = len(ids)
    out = model(torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[n]]),
                cache_position=torch.tensor([n]))
    return out.logits[0, -1].float()


@torch.inference_mode()  # as the engine runs: its scratch buffers are inference tensors
def nanokv_next_logits(llm, ids, token):
    """The same through nanokv's model and cache: the method compresses during the prefill
    (after a scoring pass of its own, if it has one)."""
    from nanokv.engine.attention import StepAttention

    cache = llm.cache
    cache.add(-1)
    try:
        passes = llm.method.scoring_passes(ids, lambda t: llm.tokenizer.encode(t, add_special_tokens=False), "\n")
        positions = torch.cat([torch.arange(len(ids))] + [torch.arange(len(ids), len(ids) + len(p)) for p in passes])
        llm.model(torch.tensor(ids + sum(passes, [])), positions,
                  StepAttention(cache, [-1], [len(positions)], positions, llm.method, [len(ids)], None,
                                 [[len(p) for p in passes]]))
        step = torch.tensor([len(ids)])
        hidden = llm.model(torch.tensor([token]), step, StepAttention(cache, [-1], [1], step))
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


def duoattention_parity(path, model, ids, compression, num_samples=50):
    """DuoAttention on the fly: kvpress's duo_attention_on_the_fly (its BookSum sample replaced by
    nanokv's calibration texts, num_samples of them, kvpress's default) against nanokv.calibrate's
    scores on the same token ids; then the heads each one streams for `ids` at the
    head_compression_ratio nanokv's `compression` gives (sink 128, recent 256 on both sides), the
    kept slots compared, and the next-token logits after the pressed prefill."""
    import json
    import tempfile

    import pandas as pd
    from kvpress import DuoAttentionPress
    from kvpress.presses import duo_attention_press

    from nanokv.calibrate import calibration_texts, duoattention_scores, model_key
    from nanokv.loading import load_model
    from nanokv.tokenizer import Tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours_tokenizer = Tokenizer.from_gguf(path)
    texts = [ours_tokenizer.decode(t) for t in calibration_texts(ours_tokenizer, num_samples, len(ids), seed=0)]
    text_ids = [tokenizer(text)["input_ids"] for text in texts]  # both sides read these ids

    class Dataset:  # what load_dataset("kmfoda/booksum", split="train") gives: a "chapter" column
        @staticmethod
        def to_pandas():
            return pd.DataFrame({"chapter": texts})

    class Tokenizers:
        @staticmethod
        def from_pretrained(_):
            return tokenizer

    saved = duo_attention_press.load_dataset, duo_attention_press.AutoTokenizer
    duo_attention_press.load_dataset = lambda *args, **kwargs: Dataset()
    duo_attention_press.AutoTokenizer = Tokenizers
    try:
        theirs = torch.tensor(duo_attention_press.duo_attention_on_the_fly(model), dtype=torch.float64)  # cached
        net, config = load_model("gguf", path, torch.float32)
        ours = duoattention_scores(net, config, text_ids)
        n, budget = len(ids), compute_n_kept(len(ids), compression)
        fraction = min(1.0, max(0.0, (n - budget) / (n - 128 - 256)))  # nanokv's head fraction for this budget
        press = DuoAttentionPress(head_compression_ratio=fraction, on_the_fly_scoring=True)
        press.post_init_from_model(model)
        streaming = press.streaming_mask.cpu()
        kept_theirs = {layer: [set(range(128)) | set(range(n - 256, n)) if streaming[layer, h] else set(range(n))
                               for h in range(config.num_kv_heads)] for layer in range(config.num_layers)}
        with tempfile.TemporaryDirectory() as tmp:
            artifact = Path(tmp) / "duoattention.json"
            artifact.write_text(json.dumps({"format": 1, "method": "duoattention", "model": model_key(str(path)),
                                            "num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads,
                                            "head_scores": ours.tolist(), "settings": {}}))
            kept_ours, llm = nanokv_kept(path, ids, "duoattention", budget, {"calibration_file": str(artifact)})
        token = ids[len(ids) // 2]
        diff = (kvpress_next_logits(model, ids, DuoAttentionPress(head_compression_ratio=fraction,
                                                                  on_the_fly_scoring=True), token)
                - nanokv_next_logits(llm, ids, token)).abs().max().item()
    finally:
        duo_attention_press.load_dataset, duo_attention_press.AutoTokenizer = saved
    agree = sum(len(t & o) for layer, heads in kept_theirs.items() for t, o in zip(heads, kept_ours[layer]))
    total = sum(len(t) for heads in kept_theirs.values() for t in heads)
    same_heads = bool((llm.method.streaming_heads(n) == streaming).all())
    print(f"{'duoattention':14} head scores max |diff| {(ours - theirs).abs().max().item():.1e} "
          f"({num_samples} texts of ~{len(ids)} tokens, scores {theirs.min().item():.3f}..{theirs.max().item():.3f}); "
          f"streaming {int(streaming.sum())} of {streaming.numel()} heads at head_compression_ratio {fraction:.4f} "
          f"({'the same heads' if same_heads else 'different heads'}); kept slots agreeing with kvpress: "
          f"{100 * agree / total:.2f}% ({agree}/{total}); next-token logits max |diff| {diff:.1e}")


def think_parity(path, model, ids, ratio=0.4):
    """ThinK alone: the channels kvpress's ThinKPress leaves nonzero in each (layer, kv-head)'s
    keys against the channels nanokv's think keeps, and the next-token logits after the prefill."""
    from kvpress import ThinKPress

    kept_theirs, original = {}, ThinKPress.compress

    def recording_compress(self, module, hidden_states, keys, values, *args, **kwargs):
        out_keys, out_values = original(self, module, hidden_states, keys, values, *args, **kwargs)
        kept_theirs[module.layer_idx] = [set(torch.nonzero(row).flatten().tolist())
                                         for row in out_keys[0].abs().amax(dim=1)]
        return out_keys, out_values

    ThinKPress.compress = recording_compress
    try:
        with torch.no_grad(), ThinKPress(key_channel_compression_ratio=ratio, window_size=32)(model):
            model(torch.tensor([ids]), past_key_values=transformers.DynamicCache())
    finally:
        ThinKPress.compress = original
    llm = LLM(str(path), dtype="float32", method="think", channel_ratio=ratio, recent=0)
    kept_ours, finish = {}, llm.scheduler.finish

    def capture(seq):
        channels = llm.cache.seqs[seq.id].channels
        kept_ours.update({layer: [set(row.tolist()) for row in channels[layer]] for layer in range(len(channels))})
        finish(seq)

    llm.scheduler.finish = capture
    llm.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    del llm.scheduler.finish
    agree = sum(len(t & o) for layer, heads in kept_theirs.items() for t, o in zip(heads, kept_ours[layer]))
    total = sum(len(t) for heads in kept_theirs.values() for t in heads)
    token = ids[len(ids) // 2]
    diff = (kvpress_next_logits(model, ids, ThinKPress(key_channel_compression_ratio=ratio, window_size=32), token)
            - nanokv_next_logits(llm, ids, token)).abs().max().item()
    print(f"{'think':14} kept key channels agreeing with kvpress: {100 * agree / total:.2f}% ({agree}/{total}, "
          f"{len(kept_theirs)} layers, {len(ids)} tokens, channel ratio {ratio}); "
          f"next-token logits max |diff| {diff:.1e}")


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
    global TOKENIZER
    TOKENIZER = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    TOKENIZER.chat_template = None
    ids = TOKENIZER((TEXT * 40))["input_ids"][:args.tokens]
    budget = compute_n_kept(len(ids), args.compression)
    for method in args.methods:
        if method == "duoattention":  # head scores from calibration texts, then the heads each streams
            duoattention_parity(path, models["sdpa"], ids, args.compression)
            continue
        if method == "think":  # channels, not tokens
            think_parity(path, models["sdpa"], ids)
            continue
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
