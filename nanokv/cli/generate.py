"""Generate text from the command line.

    python generate.py "What is the capital of France?"
    python generate.py --model qwen2.5-coder-0.5b --max-tokens 64 "Write quicksort in Python"
    python generate.py --model llama3-8b --load-format dummy   # random weights: runs, but says nothing

Text streams to stdout as it is generated; one stats line follows on stderr.

Tensor parallelism: one process per rank, each holding its share of the heads (nanokv/distributed.py);
only rank 0 prints the text and the stats line (its KV bytes are its own heads').

    torchrun --nproc-per-node 2 generate.py --device cpu --dtype float32 "Hello"
"""

import json
import sys

from nanokv.cli.args import OneLineParser, method_options

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv=None):
    from nanokv.hub import DEFAULT_MODEL, MODELS, shipped_configs
    from nanokv.loading import LOAD_FORMATS
    from nanokv.methods import METHODS

    p = OneLineParser(description="Generate text with nanokv.")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"short name ({', '.join(MODELS)}), a local HF directory, a .gguf file, "
                        f"or an HF repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto (default): the model's weights; dummy: random weights of its shape, from the config "
                        f"nanokv ships ({', '.join(shipped_configs())}) or a config.json path, and a byte tokenizer")
    p.add_argument("--method", default="full",
                   help=f"KV-cache method: {', '.join(METHODS)}, or eviction+quantization such as snapkv+kivi "
                        f"(default: full)")
    p.add_argument("--compression", type=float, default=0.0,
                   help="fraction of prompt tokens removed per (layer, head), in [0, 1) (default: 0)")
    p.add_argument("--budget", type=int, default=None,
                   help="prompt tokens kept per (layer, head), instead of --compression (quest: tokens read per step)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --method-arg window_size=16 (repeatable)")
    p.add_argument("--list-methods", action="store_true", help="list the methods with their options and papers, then exit")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on CUDA and on CPUs with bfloat16 arithmetic (AVX-512 BF16, AMX, "
                        "AVX-NE-CONVERT), float32 elsewhere; float16 is for CUDA only")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="BYTES",
                   help="KV-cache pool size: bytes, or a fraction (0, 1] of free memory")
    p.add_argument("--host-cache-memory", type=float, default=None, metavar="BYTES",
                   help="an offloading method's host tier (shadowkv, arkvale, ...): bytes, or a fraction (0, 1] of "
                        "free host memory (default: four times the KV-cache pool, at most half of free host memory)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every decode step eagerly, without CUDA graphs (vLLM's name)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="share the KV blocks of identical prompt prefixes across requests (vLLM's name; "
                        "a compressing method shares its compressed prompt, see nanokv/engine/prefix_sharing.py)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="ranks the heads are split over (default: WORLD_SIZE, as torchrun sets it; else 1): start "
                        "with `torchrun --nproc-per-node N generate.py ...`")
    p.add_argument("--stats-json", metavar="PATH", help="also write the stats line as JSON to PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_methods:
        from nanokv.methods import describe_methods
        print(describe_methods())
        return 0
    try:
        return run(args)
    except ValueError as e:  # every bad input nanokv detects is a ValueError subclass
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(args) -> int:
    from nanokv.engine.llm import LLM
    from nanokv.hardware import resolve_device
    from nanokv.hub import config_file
    from nanokv.methods import make_method
    from nanokv.sampling import SamplingParams

    # Check everything cheap before the model loads, so a typo fails in milliseconds.
    options = method_options(args.method_arg)
    make_method(args.method, args.compression, args.budget, **options)
    resolve_device(args.device)
    if args.load_format == "dummy":
        config_file(args.model)
    if not args.prompt.strip():
        raise ValueError("prompt is empty")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, method=args.method,
              compression=args.compression, budget=args.budget, kv_cache_memory=args.kv_cache_memory,
              host_cache_memory=args.host_cache_memory, load_format=args.load_format,
              enforce_eager=args.enforce_eager, enable_prefix_caching=args.enable_prefix_caching,
              tensor_parallel_size=args.tensor_parallel_size, **options)
    lead = llm.tp.rank == 0  # under tensor parallelism every rank generates the same text; one prints it
    stream = llm.stream(args.prompt, params, chat=not args.no_chat)
    for piece in stream:
        if lead:
            print(piece, end="", flush=True)
    llm.tp.close()
    if not lead:
        return 0
    print()
    m = stream.result.metrics
    dtype = str(llm.dtype).removeprefix("torch.")  # what --dtype auto chose
    stats = {"model": args.model, "method": args.method, "device": llm.device, "dtype": dtype,
             "tensor_parallel_size": llm.tp.size, **{k: m[k] for k in (
        "prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "kv_cache_bytes",
        "kv_cache_bytes_uncompressed", "kv_cache_bytes_theory", "kv_cache_tokens")}}
    # what one decode step's attention read, all layers: below what is held where a method picks
    # what to read (quest)
    stats["kv_bytes_read_per_decode_token"] = read = llm.stats["kv_bytes_read_per_decode_token"]
    stats["decode_graphs"] = llm.stats["decode_graphs"]  # replayed as CUDA graphs, or eager and why
    if args.enable_prefix_caching:
        stats["prefix_cache"] = llm.stats["prefix_cache"]  # what this method shares, or why it does not
    per_token = m["kv_cache_bytes"] / max(1, m["kv_cache_tokens"])
    theory = m["kv_cache_bytes_theory"] / max(1, m["kv_cache_tokens"])
    tp = f" x{llm.tp.size} ranks (KV: rank 0's heads)" if llm.tp.size > 1 else ""
    print(f"[{args.model} | {args.method} | {llm.device} {dtype}{tp}] prompt {m['prompt_tokens']} tok, generated {m['generated_tokens']} tok "
          f"({stream.result.finish_reason}) | prefill {m['prefill_tokens_per_s']:.1f} tok/s | "
          f"decode {m['decode_tokens_per_s']:.1f} tok/s | KV cache {m['kv_cache_bytes'] / 2**20:.2f} MiB "
          f"(full: {m['kv_cache_bytes_uncompressed'] / 2**20:.2f} MiB), {per_token:.0f} B/token "
          f"(unrounded: {theory:.0f})" + (f" | read {read / 2**20:.2f} MiB/decode token" if read else ""),
          file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
