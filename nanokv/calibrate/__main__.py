import sys

from nanokv.calibrate.cli import main

sys.exit(main())
