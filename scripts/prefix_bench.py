"""Prefix caching, measured: N requests sharing one long system prompt (each with a short user
turn of its own), run with prefix caching off and on, side by side.

    python scripts/prefix_bench.py                                   # smollm2-135m, 64 x (1,000 + 16..32)
    python scripts/prefix_bench.py --load-format dummy               # its shape with random weights
    python scripts/prefix_bench.py --method snapkv --compression 0.5 # a method that shares no raw prefix

All requests are submitted at once, as bench.py does. With caching on, the first prefill batch
computes the system prompt (its requests are admitted together, before any of it is cached) and
every later request attaches its blocks and prefills only its own turn. Bounded: the request count,
the prompt and the output lengths are fixed by the arguments; each engine runs once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def run(args, enable: bool) -> dict:
    from nanokv import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format, method=args.method,
              compression=args.compression, budget=args.budget, kv_cache_memory=args.kv_cache_memory,
              enable_prefix_caching=enable)
    rng = random.Random(args.seed)
    vocab = min(llm.config.vocab_size, 10000)
    system = [rng.randrange(100, vocab) for _ in range(args.system_tokens)]
    turns = [[rng.randrange(100, vocab) for _ in range(rng.randint(args.min_user, args.max_user))]
             for _ in range(args.num_requests)]
    # warm-up at the same prompt length on unrelated tokens (the kernels' first calls at these shapes are
    # slow), so that nothing of the system prompt is cached before the timed run
    warm = random.Random(args.seed + 1)
    llm.generate([[warm.randrange(100, vocab) for _ in range(args.system_tokens + args.max_user)]],
                 SamplingParams(max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate([system + t for t in turns], SamplingParams(max_tokens=args.max_tokens, ignore_eos=True),
                           use_tqdm=False)
    wall = time.perf_counter() - start
    s = llm.stats
    return {"hit rate": s["prefix_cache_hit_rate"], "prompt tokens": s["prefill_tokens"],
            "prefill tokens run": s["prefill_tokens_computed"], "prefill time (s)": s["prefill_s"],
            "TTFT p50 (s)": statistics.median(o.metrics["ttft_s"] for o in outputs), "total time (s)": wall,
            "peak KV (MiB)": s["peak_kv_bytes"] / 2**20, "tokens": [o.token_ids for o in outputs],
            "sharing": s.get("prefix_cache", {}).get("sharing", "off"), "device": f"{llm.device} {llm.dtype}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--load-format", default="auto", help="auto, or dummy: the model's shape with random weights")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--method", default="full")
    p.add_argument("--compression", type=float, default=0.0)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=float, default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--min-user", type=int, default=16)
    p.add_argument("--max-user", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not (0 < args.num_requests <= 1024 and 0 < args.system_tokens <= 32768 and 0 < args.min_user <= args.max_user
            and 0 < args.max_tokens <= 1024):
        p.error("keep it bounded: 1..1024 requests, 1..32768 system tokens, 1 <= min-user <= max-user, 1..1024 tokens out")
    off, on = run(args, False), run(args, True)
    print(f"prefix caching: {args.model} ({args.load_format}), {on['device']}, method {args.method} "
          f"(shares: {on['sharing']}); {args.num_requests} requests = a {args.system_tokens}-token system prompt + "
          f"{args.min_user}..{args.max_user}-token user turns, {args.max_tokens} tokens out each")
    print(f"{'':22s}{'off':>12s}{'on':>12s}{'on/off':>10s}")
    for key in ("hit rate", "prompt tokens", "prefill tokens run", "prefill time (s)", "TTFT p50 (s)",
                "total time (s)", "peak KV (MiB)"):
        a, b = off[key], on[key]
        ratio = f"{b / a:10.3f}" if a else f"{'':10s}"
        fmt = (lambda x: f"{x:12.3f}") if isinstance(a, float) else (lambda x: f"{x:12d}")
        print(f"{key:22s}{fmt(a)}{fmt(b)}{ratio}")
    same = sum(x == y for x, y in zip(off["tokens"], on["tokens"]))
    print(f"greedy outputs equal with caching on and off: {same}/{args.num_requests}")


if __name__ == "__main__":
    main()
