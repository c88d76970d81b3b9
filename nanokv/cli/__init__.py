"""The command lines: `generate.py` and `bench.py` at the repository root (and the console
scripts `nanokv-generate`, `nanokv-bench`) are thin wrappers over the modules here."""
