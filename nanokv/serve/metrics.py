"""/metrics: the engine's state in Prometheus' text format (version 0.0.4)."""

from __future__ import annotations

from nanokv.serve.engine_loop import EngineLoop


def render(loop: EngineLoop) -> str:
    llm, counters = loop.llm, loop.counters
    scheduler, cache = llm.scheduler, llm.cache
    lines = []

    def metric(name: str, kind: str, help_: str, samples):
        lines.extend([f"# HELP nanokv_{name} {help_}", f"# TYPE nanokv_{name} {kind}"])
        for labels, value in samples:
            tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"nanokv_{name}{{{tags}}} {value}" if tags else f"nanokv_{name} {value}")

    metric("requests_running", "gauge", "Requests in the running batch.", [({}, len(scheduler.running))])
    metric("requests_waiting", "gauge", "Requests queued, preempted ones included.", [({}, len(scheduler.waiting))])
    tiers = [("device", cache.pool.num_used, cache.pool.num_free, cache.used_bytes)]
    if cache.host_capacity_blocks:  # an offloading method's host tier (cache/host_tier.py)
        host_free = cache.host_free_blocks
        tiers.append(("host", cache.host_capacity_blocks - host_free, host_free, cache.host_used_bytes))
    metric("kv_blocks_used", "gauge", "KV-cache blocks holding tokens, per tier.",
           [({"tier": t}, used) for t, used, _, _ in tiers])
    metric("kv_blocks_free", "gauge", "KV-cache blocks free, per tier.", [({"tier": t}, free) for t, _, free, _ in tiers])
    metric("kv_blocks_cached", "gauge", "Free device blocks that still hold a cached prompt prefix (reused first "
           "by a request with that prefix, taken back last).", [({"tier": "device"}, cache.pool.cached_free)])
    metric("kv_bytes_used", "gauge", "KV-cache bytes held, per tier.", [({"tier": t}, b) for t, _, _, b in tiers])
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [({}, round(counters.tokens_per_second(), 3))])
    metric("preemptions_total", "counter", "Requests preempted for lack of blocks (recomputed later).",
           [({}, scheduler.num_preemptions)])
    tally = llm.tally  # the server never resets it: since the start
    metric("prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt tokens prefilled.",
           [({}, round(tally["prefix_cache_hit_tokens"] / max(1, tally["prefill_tokens"]), 4))])
    metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
           [({}, tally["prefix_cache_hit_tokens"])])
    metric("requests_total", "counter", "Requests accepted.", [({}, counters.requests)])
    metric("requests_finished_total", "counter", "Requests that finished.", [({}, counters.finished)])
    metric("requests_aborted_total", "counter", "Requests dropped because their client went away.",
           [({}, counters.aborted)])
    metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", [({}, counters.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [({}, counters.generated_tokens)])
    return "\n".join(lines) + "\n"
