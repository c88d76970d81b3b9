"""python -m nanokv.serve: the command line of the OpenAI-compatible server."""

from __future__ import annotations

import sys

from nanokv.cli.args import OneLineParser, method_options


def parse_args(argv=None):
    from nanokv.hub import DEFAULT_MODEL, MODELS
    from nanokv.loading import LOAD_FORMATS
    from nanokv.methods import METHODS

    p = OneLineParser(prog="python -m nanokv.serve",
                      description="Serve a model over HTTP with the OpenAI API (/v1/completions, /v1/chat/completions, "
                                  "/v1/models, /health, /metrics). A request may name its own KV-cache method in the "
                                  'extension field "kv_compression": {"method": "snapkv", "compression": 0.5}.')
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"short name ({', '.join(MODELS)}), a local HF directory, a .gguf file, or an HF repo id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: --model)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto (default): the model's weights; dummy: random weights of its shape")
    p.add_argument("--method", default="full",
                   help=f"the default KV-cache method, whose storage the pool is built for: {', '.join(METHODS)} "
                        "(default: full)")
    p.add_argument("--compression", type=float, default=0.0, help="the default method's compression, in [0, 1)")
    p.add_argument("--budget", type=int, default=None, help="the default method's budget, instead of --compression")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the default method (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="BYTES",
                   help="KV-cache pool size: bytes, or a fraction (0, 1] of free memory")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch (default: 256)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the KV blocks of identical prompt prefixes across requests (on by default)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn  # noqa: F401  (an extra: say how to get it before loading a model)
        import starlette  # noqa: F401
    except ImportError:
        print("error: the server needs the serve extra: pip install 'nanokv[serve]'", file=sys.stderr)
        return 2
    try:
        server = make_server(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.run()
    return 0


def make_server(args):
    """The uvicorn server of `args` (run() serves; the engine loop starts and stops with it)."""
    import uvicorn

    from nanokv.engine.llm import LLM
    from nanokv.methods import make_method
    from nanokv.serve.app import build_app
    from nanokv.serve.engine_loop import EngineLoop

    options = method_options(args.method_arg)
    make_method(args.method, args.compression, args.budget, **options)  # a typo fails before the model loads
    kv_cache_memory = args.kv_cache_memory
    if kv_cache_memory is not None and kv_cache_memory > 1:
        kv_cache_memory = int(kv_cache_memory)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, method=args.method, compression=args.compression,
              budget=args.budget, kv_cache_memory=kv_cache_memory, max_num_seqs=args.max_num_seqs,
              load_format=args.load_format, enforce_eager=args.enforce_eager,
              enable_prefix_caching=not args.no_prefix_caching, **options)
    loop = EngineLoop(llm)
    app = build_app(loop, args.served_model_name or args.model)
    return uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
