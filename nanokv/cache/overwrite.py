"""Reading and overwriting chosen tokens of one sequence's layer in place (CacheBlend's recomputed
tokens: nanokv/engine/blending.py). read_prompt / write_prompt (kv_cache.py) take a prompt's first n
slots whole; these take the slots `slots` [r] alone, the same in every kv-head (a prompt written
in order, nothing evicted: slot j holds position j in every head)."""

from __future__ import annotations

import torch


def _index(cache, seq_id: int, layer: int, slots: torch.Tensor):
    tables = cache.held(seq_id, layer)[0][0]                                      # [H, nb]
    return cache.pool.slot_index(cache.flat_slots(tables, slots.to(tables.device).expand(len(tables), len(slots))))


def read_tokens(cache, seq_id: int, layer: int, slots: torch.Tensor, names=("k",)) -> dict[str, torch.Tensor]:
    """Fields of the slots `slots` of every head of `layer`: [H, r(, D)] per name."""
    index = _index(cache, seq_id, layer, slots)
    return {name: cache.pool.fields[name][index] for name in names}


def write_tokens(cache, seq_id: int, layer: int, slots: torch.Tensor, values: dict[str, torch.Tensor]):
    """Set fields of the slots `slots` of every head of `layer`: values [H, r(, D)] per name."""
    index = _index(cache, seq_id, layer, slots)
    for name, value in values.items():
        cache.pool.fields[name][index] = value.to(cache.pool.fields[name].dtype)
