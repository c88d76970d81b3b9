"""nanokv: a small inference engine that owns its KV cache.

    from nanokv import LLM, SamplingParams
"""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # Imported on first use, so `import nanokv.hub` (e.g. for `generate.py --help`) stays light.
    if name == "LLM":
        from nanokv.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from nanokv.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'nanokv' has no attribute {name!r}")
