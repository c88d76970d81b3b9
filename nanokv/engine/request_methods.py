"""RequestMethods: the compression methods one engine serves, the engine's own and each request's.

A request may name its own method and settings (the server's `kv_compression` field, or
`LLM.generate(..., method=...)`). One pool serves them all, so a request's method must ask for the
same storage as the engine's (`Method.cache_request`: block kind, slot fields, host tier): snapkv,
pyramidkv, quest, streamingllm ... share `full`'s plain blocks, while kivi's quantized blocks or
h2o's score field need an engine started with that method. Each (name, settings) is made once, and
bound to the model as the engine binds its own (calibration profile, vocabulary).

Which methods share a step:
- a prefill step runs one method: compression happens inside the forward pass, layer by layer, and a
  step's attention drives one method's roles (engine/attention.py);
- a decode step mixes every method with no decode-time role (no page reads, host recalls, decode
  evictions or logit bias): once its prompt is compressed, such a sequence decodes exactly as `full`
  does over the blocks it kept. A method with a decode-time role decodes in steps of its own.
"""

from __future__ import annotations

from nanokv.methods import make_method
from nanokv.methods.base import Method


def method_key(name: str, compression: float = 0.0, budget: int | None = None, **options) -> tuple:
    """What makes two requests' methods the same method: its name and every setting."""
    return (name, float(compression), budget, tuple(sorted(options.items())))


def decode_role(method: Method) -> str | None:
    """What a method does in a decode step beyond `full`'s attention, or None (it shares any decode
    step with other such methods)."""
    if method.offloads:
        return "recalls tokens from host memory"
    if method.evicts_during_decode:
        return "evicts during decode"
    if method.selects_pages:
        return "picks the pages each step reads"
    if method.attention_bias is not None:
        return "weighs slots by a logit bias"
    return None


class RequestMethods:
    def __init__(self, default: Method, default_key: tuple, cache, bind):
        """default: the engine's method (its cache was built for it); bind(method): bind a new method to
        the model (calibration, vocabulary) as the engine bound its own."""
        self.default, self.cache, self.bind = default, cache, bind
        self.made: dict[tuple, Method] = {default_key: default}
        self._storage = default.cache_request(cache.num_layers, cache.model_head_dim)

    def get(self, name: str, compression: float = 0.0, budget: int | None = None, **options) -> Method:
        """The method for these settings (made and bound on first use); a ValueError when it cannot run
        on this engine's pool."""
        key = method_key(name, compression, budget, **options)
        if key in self.made:
            return self.made[key]
        method = make_method(name, compression, budget, **options)
        storage = method.cache_request(self.cache.num_layers, self.cache.model_head_dim)
        if storage != self._storage:
            raise ValueError(
                f"method {method.name!r} needs storage this engine's pool does not have (it was built for "
                f"{self.default.name!r}: {describe_storage(self._storage)}; {method.name!r} needs "
                f"{describe_storage(storage)}); start the engine with --method {method.name}")
        self.bind(method)
        if method.evicts_during_decode:
            self.cache.reserve_scratch()  # its decode steps write there (as ModelRunner does for the default)
        self.made[key] = method
        return method

    @staticmethod
    def same_prefill(a: Method, b: Method) -> bool:
        return a is b

    @staticmethod
    def same_decode(a: Method, b: Method) -> bool:
        return a is b or (decode_role(a) is None and decode_role(b) is None)


def describe_storage(request) -> str:
    """The storage a method asks for (a CacheRequest), in a few words (for the error above)."""
    parts = []
    if request.quantization is not None:
        parts.append("quantized blocks")
    if request.latent_layers is not None:
        parts.append("low-rank latents")
    if request.key_channels is not None:
        parts.append("slim keys")
    if request.pairs:
        parts.append("merged layer pairs")
    if request.sources is not None and request.sources != list(range(len(request.sources))):
        parts.append("shared layers")
    if request.slot_fields:
        parts.append("per-token fields " + ", ".join(request.slot_fields))
    if request.key_bounds:
        parts.append("page key bounds")
    if request.host_tier is not None:
        parts.append("a host-memory tier")
    return " and ".join(parts) or "plain blocks"
