"""What nanokv's methods keep against what NVIDIA kvpress keeps, on SmolLM2 in float32.

kvpress pins transformers < 5.3, so it runs in a virtual environment of its own:

    python3.11 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf jinja2
    PYTHONPATH=. /tmp/kvenv/bin/python scripts/kvpress_parity.py

For each method: the same ~1,000-token prompt, compression 0.5, kvpress's settings on both
sides; the kept positions per (layer, kv-head) are compared and the share of kept slots the
two agree on is printed, with the largest difference between the two engines' logits for
one more token fed after the compressed prefill. transformers loads the same GGUF file.
"""

import argparse

import torch
import transformers
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
from kvpress.utils import compute_n_kept

from kernels.reference import gather_blocks
from nanokv import LLM, SamplingParams
from nanokv.hub import resolve_model

# nanokv method -> (kvpress press at ratio r, nanokv options that match kvpress's settings)
PAIRS = {
    "knorm": (lambda r: KnormPress(compression_ratio=r), {"skip_layers": 0}),
    "streaming_llm": (lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4), {"sink_tokens": 4}),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5),
               {"window_size": 64, "kernel_size": 5, "pooling": "avg"}),
}

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined a screw press with movable metal type. Within decades, presses spread across Europe, "
        "books became cheaper, and literacy rose. ")


def kvpress_kept(model, ids, press, ratio):
    """{layer: [H, n_kept] sorted positions} kvpress keeps: its own scores, its own top-k."""
    scores = {}
    original = type(press).score

    def recording_score(self, module, *args, **kwargs):
        s = original(self, module, *args, **kwargs)
        scores[module.layer_idx] = s[0].detach()
        return s

    type(press).score = recording_score
    try:
        with torch.no_grad(), press(model):
            model(torch.tensor([ids]), past_key_values=transformers.DynamicCache())
    finally:
        type(press).score = original
    n_kept = compute_n_kept(len(ids), ratio)
    return {layer: s.topk(n_kept, dim=-1).indices.sort(-1).values for layer, s in scores.items()}


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
    """{layer: [H, n_kept] sorted positions} nanokv's cache holds after the prefill."""
    llm = LLM(str(path), dtype="float32", method=method, budget=budget, **options)
    held = {}
    finish = llm.scheduler.finish

    def capture(seq):
        s = llm.cache.seqs[seq.id]
        for layer in range(llm.config.num_layers):
            pos = gather_blocks(llm.cache.pool.pos, s.tables[layer, :, :int(s.num_blocks[layer].max())])
            held[layer] = pos[:, :budget].long().sort(-1).values  # the prompt's kept slots come first
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
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer((TEXT * 40))["input_ids"][:args.tokens]
    budget = compute_n_kept(len(ids), args.compression)
    for method in args.methods:
        make_press, options = PAIRS[method]
        theirs = kvpress_kept(model, ids, make_press(args.compression), args.compression)
        ours, llm = nanokv_kept(path, ids, method, budget, options)
        agree = total = 0
        for layer, kept in theirs.items():
            for h in range(kept.shape[0]):
                agree += len(set(kept[h].tolist()) & set(ours[layer][h].tolist()))
                total += kept.shape[1]
        token = ids[len(ids) // 2]  # any token will do as the next one
        diff = (kvpress_next_logits(model, ids, make_press(args.compression), token)
                - nanokv_next_logits(llm, ids, token)).abs().max().item()
        print(f"{method:14} kept slots agreeing with kvpress: {100 * agree / total:.2f}% "
              f"({agree}/{total}, {len(theirs)} layers, {len(ids)} tokens, keep {budget}); "
              f"next-token logits max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
