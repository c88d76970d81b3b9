"""Every method by the name users know it, and the one place methods are made."""

from nanokv.methods.adakv import AdaKV
from nanokv.methods.h2o import H2O
from nanokv.methods.base import Method
from nanokv.methods.knorm import KNorm
from nanokv.methods.pyramidkv import PyramidKV
from nanokv.methods.random import RandomMethod
from nanokv.methods.snapkv import SnapKV
from nanokv.methods.streaming_llm import StreamingLLM
from nanokv.methods.tova import TOVA

METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, RandomMethod, StreamingLLM, KNorm, SnapKV, PyramidKV, AdaKV, H2O, TOVA)}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return name


def make_method(name: str, compression: float = 0.0, budget: int | None = None, **options) -> Method:
    return METHODS[check_method(name)](compression=compression, budget=budget, **options)


def describe_methods() -> str:
    lines = []
    for name, m in METHODS.items():
        opts = ", ".join(f"{k}={d!r}" for k, (_, d, _, _) in m.options.items())
        lines.append(f"{name:14} {m.description}" + (f" [{opts}]" if opts else "") + (f" {m.paper}" if m.paper else ""))
    return "\n".join(lines)
