import sys

from nanokv.serve.cli import main

sys.exit(main())
