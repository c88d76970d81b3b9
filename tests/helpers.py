"""Shared test helpers: run nanokv's model over its own cache, and transformers' greedy loop."""

import torch

from nanokv.cache import CacheAttention, PagedKVCache


def single_sequence_cache(cfg, dtype=torch.float32, block_size=16):
    cache = PagedKVCache.from_memory(cfg, 32 << 20, block_size, dtype)
    cache.add(0)
    return cache


def nanokv_forward(model, cache, ids):
    """One forward pass of sequence 0 over the paged cache, new tokens after those cached."""
    start = int(cache.seqs[0].lengths[0, 0])
    positions = torch.arange(start, start + len(ids))
    attention = CacheAttention(cache, [0], [len(ids)], positions)
    return model.compute_logits(model(torch.as_tensor(ids), positions, attention))


@torch.no_grad()
def nanokv_logits(model, cfg, ids, dtype=torch.float32):
    return nanokv_forward(model, single_sequence_cache(cfg, dtype), ids)


@torch.no_grad()
def nanokv_greedy(model, cfg, ids, steps, dtype=torch.float32):
    cache = single_sequence_cache(cfg, dtype)
    logits = nanokv_forward(model, cache, ids)[-1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = nanokv_forward(model, cache, [out[-1]])[-1]
    return out


@torch.no_grad()
def hf_greedy(hf, ids, steps):
    """transformers' own incremental decode (its KV cache), returning the tokens and the
    logits each token was chosen from."""
    out = hf(torch.as_tensor(ids)[None], use_cache=True)
    tokens, chosen_from = [], []
    for _ in range(steps):
        logits = out.logits[0, -1].float()
        tokens.append(int(logits.argmax()))
        chosen_from.append(logits)
        out = hf(torch.tensor([[tokens[-1]]]), use_cache=True, **_hf_cache_kwarg(hf, out))
    return tokens, chosen_from


def assert_same_greedy(ours, theirs, their_logits, tie=1e-4):
    """Identical greedy tokens, except that a first divergence is allowed where transformers'
    own top-2 logits differ by less than `tie` (a near tie that float rounding may flip)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = their_logits[i].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < tie, f"greedy tokens diverge at step {i} ({a} vs {b}) where the top-2 gap is {gap:.2e}"
            return i
    assert len(ours) == len(theirs)
    return None


def _hf_cache_kwarg(hf, out):
    """transformers 5.2x renamed `past_key_values` to `cache`; accept either."""
    import inspect

    if "cache" in inspect.signature(hf.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}
