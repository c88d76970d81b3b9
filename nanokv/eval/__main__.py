"""python -m nanokv.eval: accuracy of compression methods on RULER-style tasks, as a grid.

    python -m nanokv.eval                                   # the quick grid on SmolLM2
    python -m nanokv.eval --methods full,snapkv --compression 0.5,0.9 --lengths 4096 --out runs/big

Arguments are checked before any model is loaded. Rerunning with the same --out resumes.
"""

import argparse
import sys
from pathlib import Path

from nanokv.eval.grid import PLACEMENTS, plot, run, settings, summarize
from nanokv.eval.tasks import TASKS, check_tasks

QUICK_TASKS = "niah_number,niah_word,niah_multikey"  # see the README for vt, fwe and cwe on SmolLM2


def csv_of(kind, name):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}")
        return values
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanokv.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", type=csv_of(str, "--methods"), default="full,snapkv,knorm,streaming_llm",
                   help="comma-separated methods (see generate.py --list-methods), options after colons: "
                        "full,kivi:bits=4,snapkv+kivi:bits=4")
    p.add_argument("--compression", type=csv_of(float, "--compression"), default="0.5,0.75",
                   help="fractions removed, e.g. 0.25,0.5,0.75,0.9")
    p.add_argument("--budget", type=csv_of(int, "--budget"), default="", help="tokens kept per (layer, head)")
    p.add_argument("--lengths", type=csv_of(int, "--lengths"), default="1024,2048", help="prompt lengths in tokens")
    p.add_argument("--tasks", type=csv_of(str, "--tasks"), default=QUICK_TASKS, help=f"from: {', '.join(TASKS)}")
    p.add_argument("--placements", type=csv_of(str, "--placements"), default="after,inside",
                   help="; ".join(f"{k}: {v}" for k, v in PLACEMENTS.items()))
    p.add_argument("--samples", type=int, default=3, help="samples per (task, length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on CUDA and on CPUs with bfloat16 arithmetic, else float32")
    p.add_argument("--kv-cache-memory", type=float, default=None, help="bytes, or a fraction of free memory")
    p.add_argument("--out", type=Path, default=Path("eval_out"))
    return p.parse_args(argv)


def check(args):
    """Everything that can be wrong with the arguments, before a model is loaded."""
    from nanokv.hub import resolve_model
    from nanokv.loading import read_config
    from nanokv.methods import check_method, make_method, runs_once, selects_pages

    if not args.methods:
        raise ValueError("--methods is empty; give at least one, e.g. full,snapkv")
    for m in args.methods:
        check_method(m)
    check_tasks(args.tasks)
    for p in args.placements:
        if p not in PLACEMENTS:
            raise ValueError(f"unknown placement {p!r}; valid: {', '.join(PLACEMENTS)}")
    if args.samples <= 0:
        raise ValueError(f"--samples must be a positive integer, got {args.samples}")
    if any(not runs_once(m) for m in args.methods) and not (args.compression or args.budget):
        raise ValueError("give --compression or --budget for the compression methods (all but full, the quantizers "
                         "alone and cacheblend)")
    readers = [m for m in args.methods if selects_pages(m)]
    if readers and not args.budget:
        raise ValueError(f"give --budget for {', '.join(readers)} (tokens read per decode step, or keys per query row "
                         f"of a sparse prefill), e.g. --budget 128,256,512")
    for s in settings(args.methods, args.compression, args.budget):
        make_method(s.method, s.compression, s.budget)  # range checks
    source = resolve_model(args.model)
    limit = read_config(source.kind, source.path).max_position_embeddings
    for n in args.lengths:
        if not 128 <= n < limit:
            raise ValueError(f"length {n} is outside [128, {limit}) for {args.model} (its context is {limit})")
    return source


def main(argv=None):
    args = parse_args(argv)
    try:
        source = check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from nanokv import LLM

    def llm_factory(setting):  # kv_cache_memory: bytes or a fraction, as LLM reads it (generate.py passes it so too)
        return LLM(str(source.path), dtype=args.dtype, method=setting.method, compression=setting.compression,
                   budget=setting.budget, kv_cache_memory=args.kv_cache_memory)

    grid = settings(args.methods, args.compression, args.budget)
    run(llm_factory, grid, args.lengths, args.tasks, args.placements, args.samples, args.seed, args.out)
    cells = summarize(args.out)
    print((args.out / "table.md").read_text())
    try:
        for path in plot(cells, args.out):
            print(f"wrote {path}")
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install nanokv[plot])", file=sys.stderr)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.csv'}, {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
