"""Load-test the OpenAI-compatible server: requests/s, TTFT and inter-token latency per KV-cache method.

    python scripts/load_test.py --model smollm2-135m --kv-cache-memory 200e6 --methods full snapkv:0.5

Starts `python -m nanokv.serve` on a free loopback port (or uses --url, which must be loopback), then for
each method sends the same --requests streaming completions, --concurrency at a time, each naming the
method in the `kv_compression` field: every method runs against the same pool. It stops after
--requests per method or --time-limit seconds in all, whichever comes first, and prints one table.
Needs the openai client (pip install openai, or nanokv[test]).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the cache keeps keys and values of every token so that attention can read them again at each step "
         "while a method drops merges or quantizes what matters least").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--kv-cache-memory", type=float, default=200e6, help="the server's pool, bytes (default: 200e6)")
    p.add_argument("--methods", nargs="+", default=["full", "snapkv:0.5"],
                   help="NAME or NAME:COMPRESSION, each run in turn (default: full snapkv:0.5)")
    p.add_argument("--requests", type=int, default=64, help="requests per method (default: 64)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default: 32)")
    p.add_argument("--prompt-words", type=int, default=400, help="words per prompt (default: 400)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default: 64)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole test (default: 900)")
    p.add_argument("--url", default=None, help="a running server's http://127.0.0.1:PORT instead of starting one")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "nanokv.serve", "--model", args.model, "--load-format", args.load_format,
               "--dtype", args.dtype, "--port", str(port), "--host", "127.0.0.1",
               "--kv-cache-memory", str(int(args.kv_cache_memory)), "--max-num-seqs", str(args.concurrency)]
    if args.device:
        command += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.5)


def metric(url: str, name: str) -> float:
    for line in urllib.request.urlopen(f"{url}/metrics").read().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def run_method(client, model: str, spec: dict, prompts: list[str], args, deadline: float) -> dict:
    """The requests of one method -> requests/s, TTFT and inter-token latency percentiles (seconds)."""
    gate = asyncio.Semaphore(args.concurrency)
    ttfts, itls, done = [], [], 0

    async def one(prompt):
        nonlocal done
        async with gate:
            if time.time() > deadline:
                return
            start = time.perf_counter()
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "kv_compression": spec})
            first = last = None
            tokens = 0
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and first is None:
                    first = now
                if chunk.choices:
                    last = now
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            ttfts.append(first - start)
            if tokens > 1:  # pieces may hold several tokens (text held back until it is whole): per token
                itls.append((last - first) / (tokens - 1))
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    q = lambda xs, p: statistics.quantiles(xs, n=10)[p // 10 - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))
    return {"requests": done, "wall_s": wall, "requests_per_s": done / wall,
            "ttft_p50_s": q(ttfts, 50), "ttft_p90_s": q(ttfts, 90),
            "itl_mean_s": statistics.fmean(itls) if itls else float("nan"), "itl_p90_s": q(itls, 90)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import openai
    except ImportError:
        raise SystemExit("the load test needs the openai client: pip install openai")
    if args.url and urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must be a loopback address, got {args.url}")
    server, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    model = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"]
    rng = random.Random(0)
    prompts = [f"Request {i}. " + " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
               for i in range(args.requests)]
    deadline = time.time() + args.time_limit
    results = {}
    async def every_method():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=args.time_limit)
        for method in args.methods:
            name, _, compression = method.partition(":")
            spec = {"method": name, "compression": float(compression or 0)}
            # one request first, not timed: the first steps of a fresh server build kernels and warm caches
            await client.completions.create(model=model, prompt=prompts[0], max_tokens=4, extra_body={
                "kv_compression": spec})
            preempted = metric(url, "nanokv_preemptions_total")
            results[method] = await run_method(client, model, spec, prompts, args, deadline)
            results[method]["preemptions"] = int(metric(url, "nanokv_preemptions_total") - preempted)

    try:
        asyncio.run(every_method())
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(f"\n{model}: {args.requests} requests of {args.prompt_words} words, {args.max_tokens} tokens each, "
          f"{args.concurrency} in flight, pool {args.kv_cache_memory / 1e6:.0f} MB\n")
    print("| method | requests | requests/s | TTFT p50 (s) | TTFT p90 (s) | inter-token (ms) | preemptions |")
    print("|---|---|---|---|---|---|---|")
    base = results[args.methods[0]]
    for method, r in results.items():
        ratio = f" ({r['requests_per_s'] / base['requests_per_s']:.2f}x)" if method != args.methods[0] else ""
        print(f"| {method} | {r['requests']} | {r['requests_per_s']:.2f}{ratio} | {r['ttft_p50_s']:.2f} | "
              f"{r['ttft_p90_s']:.2f} | {1000 * r['itl_mean_s']:.1f} | {r['preemptions']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
