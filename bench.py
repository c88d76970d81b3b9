"""Throughput, latency and memory, side by side with transformers (the code is nanokv/cli/bench.py).

    python bench.py --compare hf
    python bench.py --help
"""

import sys

from nanokv.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
