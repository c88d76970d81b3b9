"""Generate text from the command line (the code is nanokv/cli/generate.py).

    python generate.py "What is the capital of France?"
    python generate.py --help
"""

import sys

from nanokv.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
