"""Where nanokv keeps what it makes on this machine: the GGUFs it assembles from PyPI (hub.py),
the C++ kernels it builds (kernels/cpu.py) and the calibration artifacts (calibrate/). Imports
nothing heavy, so `import nanokv.hub` stays light, and nothing of nanokv, so any layer may use it."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$NANOKV_CACHE, else $XDG_CACHE_HOME/nanokv, else ~/.cache/nanokv."""
    if os.environ.get("NANOKV_CACHE"):
        return Path(os.environ["NANOKV_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nanokv"
