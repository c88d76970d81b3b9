"""Throughput benchmark, side by side with transformers. Not ready yet: it arrives with the
batching engine (continuous batching over the paged head-block cache)."""

import sys

if __name__ == "__main__":
    print("bench.py is not ready yet: it needs the batching engine. "
          "Use `python generate.py` for single-request speed in the meantime.", file=sys.stderr)
    sys.exit(2)
