"""Quality harness: RULER-style long-context tasks (tasks.py, over the filler of nanokv/haystack.py),
the method x budget grid through the engine (grid.py) and its command line (python -m nanokv.eval)."""
