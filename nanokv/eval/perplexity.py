"""python -m nanokv.eval.perplexity: perplexity of a fixed text read through each method's cache.

    python -m nanokv.eval.perplexity --methods full,int8,kivi:bits=4,kivi:bits=2 --tokens 1024

The text is teacher-forced one token at a time after a short prefill, through the same cache,
kernels and compression as generation: every token after the prefill is predicted from the
cache as the method left it (quantized blocks, the residual, evicted tokens), which is what a
quantized cache changes. The default text is the "Execution model" chapter of the Python
language reference, as the standard library ships it (pydoc_data), so it is fixed and
offline; --text FILE reads another.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def default_text() -> str:
    from pydoc_data.topics import topics

    return topics["execmodel"]


@torch.inference_mode()
def perplexity(llm, ids: list[int], prefill: int) -> tuple[float, float, float]:
    """exp(mean negative log-likelihood) of ids[prefill:], each token predicted from the cache
    holding every token before it (the first `prefill` ones written in one prefill step); and the
    KV bytes per token the cache held at the end, as stored (whole blocks) and unrounded (what its
    tokens take: codes, scales, the residual, with no block rounding)."""
    from nanokv.engine.attention import StepAttention

    if not 0 < prefill < len(ids):
        raise ValueError(f"prefill must be in [1, {len(ids)}) for a text of {len(ids)} tokens, got {prefill}")
    cache, model, device = llm.cache, llm.model, llm.device
    seq_id = -1  # never a request id
    cache.add(seq_id)
    nll = []
    try:
        step, start = ids[:prefill], 0
        for target in [*ids[prefill:], None]:
            positions = torch.arange(start, start + len(step), device=device)
            attention = StepAttention(cache, [seq_id], [len(step)], positions, llm.method,
                                       token_ids=torch.tensor(step, device=device), send=llm.runner.send)
            hidden = model(attention.ids, attention.positions, attention)
            attention.finish()
            if target is None:
                break
            logits = model.compute_logits(hidden[-1:])[0].float()
            nll.append(float(torch.logsumexp(logits, 0) - logits[target]))
            start += len(step)
            step = [target]
        held, unrounded = cache.seq_bytes(seq_id) / len(ids), cache.theoretical_bytes(seq_id) / len(ids)
    finally:
        cache.free(seq_id)
    return math.exp(sum(nll) / len(nll)), held, unrounded


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanokv.eval.perplexity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="full,int8,int4,kivi:bits=4,kivi:bits=2",
                   help="comma-separated methods, options after colons (kivi:bits=4)")
    p.add_argument("--compression", type=float, default=0.0,
                   help="for eviction methods: the fraction removed (full and quantizers alone keep every token)")
    p.add_argument("--text", help="a UTF-8 text file (default: the Python reference's 'Execution model')")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text scored (default: 1024)")
    p.add_argument("--prefill", type=int, default=64, help="leading tokens written in one prefill (default: 64)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on CUDA and on CPUs with bfloat16 arithmetic, else float32")
    args = p.parse_args(argv)
    from nanokv.methods import check_method, is_quantizer

    try:
        methods = [check_method(m) for m in args.methods.split(",") if m.strip()]
        text = open(args.text, encoding="utf-8").read() if args.text else default_text()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from nanokv import LLM

    print("| method | perplexity | KV bytes / token (stored) | (unrounded) |\n|---|---|---|---|")
    for method in methods:
        keeps_all = method == "full" or is_quantizer(method)  # so one list can hold full, kivi and snapkv+kivi
        llm = LLM(args.model, dtype=args.dtype, method=method, compression=0.0 if keeps_all else args.compression)
        ids = llm.tokenizer.encode(text)[:args.tokens]
        ppl, held, unrounded = perplexity(llm, ids, args.prefill)
        print(f"| {method} | {ppl:.3f} | {held:.0f} | {unrounded:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
