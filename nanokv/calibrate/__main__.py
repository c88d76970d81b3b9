import sys

from nanokv.calibrate import main

sys.exit(main())
