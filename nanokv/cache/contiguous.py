"""A contiguous KV cache for one sequence: per layer, K and V rows plus the position of
every row. It is also the `attention` callable the model calls (see models/llama.py).

Storage grows by doubling, so appending one decode token is amortised O(1).
"""

import torch

from kernels.reference import attention_by_position
from nanokv.config import ModelConfig


class ContiguousKVCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                 capacity: int = 256):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        shape = (cfg.num_layers, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.positions = torch.empty(capacity, dtype=torch.long, device=device)
        self.length = 0
        self.new_positions = None  # positions of the tokens in the current forward pass

    def begin_forward(self, positions: torch.Tensor):
        """Called once per forward pass, before layer 0, with the new tokens' positions."""
        needed = self.length + len(positions)
        if needed > self.k.shape[1]:
            self._grow(max(needed, 2 * self.k.shape[1]))
        self.positions[self.length:needed] = positions
        self.new_positions = positions

    def end_forward(self):
        self.length += len(self.new_positions)
        self.new_positions = None

    def __call__(self, layer, q, k, v, sliding_window):
        start, end = self.length, self.length + len(q)
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return attention_by_position(q, self.k[layer, :end], self.v[layer, :end],
                                     self.new_positions, self.positions[:end], sliding_window)

    def _grow(self, capacity: int):
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty((old.shape[0], capacity, *old.shape[2:]), dtype=old.dtype, device=old.device)
            new[:, :self.length] = old[:, :self.length]
            setattr(self, name, new)
        positions = torch.empty(capacity, dtype=torch.long, device=self.device)
        positions[:self.length] = self.positions[:self.length]
        self.positions = positions

    @property
    def nbytes(self) -> int:
        """Bytes of K and V actually held for the sequence (not the spare capacity)."""
        per_token = 2 * self.cfg.num_layers * self.cfg.num_kv_heads * self.cfg.head_dim
        return self.length * per_token * self.k.element_size()
