"""Quality harness: RULER-style long-context tasks (tasks.py, haystack.py), the method x budget
grid through the engine (grid.py) and its command line (python -m nanokv.eval)."""
