"""How long the host takes to set up one decode step (StepAttention's inputs: slots, tables, the
one copy), with no model and no attention: on a GPU this is the floor of a step's time.

    python scripts/decode_host_profile.py                 # 1B shape: 16 layers x 8 kv-heads, B=128
    python scripts/decode_host_profile.py --batch 32 --layers 32 --profile

Every sequence holds ~250-380 tokens in blocks of 16; each step appends one token to each (every
16th step a sequence crosses into a new block).
"""

import argparse
import cProfile
import pstats
import time
from types import SimpleNamespace

import torch

from nanokv.cache import PagedKVCache
from nanokv.engine.attention import StepAttention


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    args = p.parse_args()
    cfg = SimpleNamespace(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=64)
    cache = PagedKVCache.from_memory(cfg, 2 << 30, 16, torch.bfloat16)
    for field in cache.pool.fields.values():
        field.zero_()  # the pool's first touch (page faults on a CPU) out of the timing
    ids = list(range(args.batch))
    for s in ids:
        cache.add(s)
        cache.append_slots(s, 250 + s)

    def step():
        positions = torch.tensor([int(cache.seqs[s].lengths[0, 0]) for s in ids])
        StepAttention(cache, ids, [1] * len(ids), positions, token_ids=torch.zeros(len(ids), dtype=torch.long)).finish()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"host set-up of a decode step, B={args.batch}, {args.layers} layers x {args.kv_heads} kv-heads: "
          f"{(time.perf_counter() - start) / args.steps * 1e3:.2f} ms")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [step() for _ in range(10)])
        pstats.Stats(profiler).sort_stats("cumtime").print_stats(15)


if __name__ == "__main__":
    main()
