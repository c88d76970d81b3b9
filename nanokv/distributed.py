"""The tensor-parallel group: which rank this process is, of how many, and the few collectives
tensor parallelism needs (as in nano-vllm and vLLM).

    torchrun --nproc-per-node 2 generate.py --device cpu --dtype float32 ...

torchrun starts one process per rank and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `TensorParallel.from_env` reads it and joins
the process group: NCCL on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU. Every rank holds
its share of the attention heads and of the MLP (nanokv/models/parallel.py), its own heads' KV
blocks, and runs the same engine loop; the collectives keep the ranks in step:

    all_reduce   the row-parallel linears' partial sums (o_proj, down_proj: two per decoder block);
                 with op "min" / "max", the block counts the scheduler decides by
    all_gather   every rank's heads' scores, for a method that selects across a layer's heads
    broadcast    rank 0's sampled tokens, so sampling (a temperature, a seed) agrees

At size 1 (WORLD_SIZE unset or 1) every collective is the identity and torch.distributed is never
imported, so one GPU or the CPU runs the very same code without a process group.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import os
from datetime import timedelta

import torch

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def valid_sizes(*counts: int) -> list[int]:
    """The world sizes that divide every one of `counts` (heads, kv-heads, MLP width)."""
    return [n for n in range(1, min(counts) + 1) if all(c % n == 0 for c in counts)]


def rank_slice(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank` of `size`'s contiguous 1 / size of `x` along `dim` (a view): the ranks hold the
    heads (and MLP rows) in runs, in rank order, so global index = rank * (n / size) + local index."""
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n)


def shard_config(cfg, size: int):
    """The ModelConfig as one of `size` ranks' layers see it: num_heads / size query heads,
    num_kv_heads / size kv-heads, intermediate_size / size of the MLP. A clear error when they do
    not divide."""
    if size == 1:
        return cfg
    counts = {"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
              "intermediate_size": cfg.intermediate_size}
    if any(v % size for v in counts.values()):
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's "
                         + ", ".join(f"{k}={v}" for k, v in counts.items())
                         + f"; valid sizes: {', '.join(map(str, valid_sizes(*counts.values())))}")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // size, num_kv_heads=cfg.num_kv_heads // size,
                               intermediate_size=cfg.intermediate_size // size)


class TensorParallel:
    """This process's place in the tensor-parallel group. `rank`, `size`; `device` (cuda:LOCAL_RANK
    under NCCL). Build one with `from_env`; `TensorParallel()` is the single-process group."""

    def __init__(self, rank: int = 0, size: int = 1, device: str = "cpu", timeout_s: float | None = None):
        self.rank, self.size, self.device = rank, size, str(device)
        if size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if self.device.startswith("cuda") else "gloo"
                timeout = timedelta(seconds=timeout_s or float(os.environ.get("NANOKV_TP_TIMEOUT_S", 600)))
                dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
                atexit.register(self._at_exit)  # once, by whoever joined the group
            self._dist = dist

    @classmethod
    def from_env(cls, device: str, size: int | None = None) -> "TensorParallel":
        """The group torchrun describes in the environment, checked against `size` (None: WORLD_SIZE,
        else 1). On CUDA each rank takes cuda:LOCAL_RANK."""
        world = _env_int("WORLD_SIZE", 1)
        if size is None:
            size = world
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        if size != world:
            raise ValueError(f"tensor_parallel_size={size} but WORLD_SIZE={world}: start one process per rank, "
                             f"e.g. `torchrun --nproc-per-node {size} generate.py ...`")
        if size == 1:
            return cls(device=device)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < size:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={size}")
        if str(device).startswith("cuda"):
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s): one GPU per rank")
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        return cls(rank, size, device)

    # --- splitting the model ----------------------------------------------------------------

    def shard_config(self, cfg):
        """The ModelConfig as this rank's layers see it (`shard_config`)."""
        return shard_config(cfg, self.size)

    def own(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's 1 / size of `x` along `dim` (its heads of a per-head table), contiguous slices
        in rank order: global index = rank * (n / size) + local index."""
        return x if self.size == 1 else rank_slice(x, dim, self.rank, self.size)

    # --- collectives ------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """x summed (or "min", "max") over the ranks, in place; returns x."""
        if self.size > 1:
            ops = {"sum": self._dist.ReduceOp.SUM, "min": self._dist.ReduceOp.MIN, "max": self._dist.ReduceOp.MAX}
            self._dist.all_reduce(x, op=ops[op])
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's `x` (each the same shape), concatenated along `dim` in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x`, on every rank (in place)."""
        if self.size > 1:
            self._dist.broadcast(x, src=src)
        return x

    def agree(self, counts: list[int], op: str) -> list[int]:
        """Host integers made equal on every rank: each the "min" or "max" over the ranks (one
        all-reduce for the whole list). The scheduler's block counts (engine/scheduler.py)."""
        if self.size == 1 or not counts:
            return list(counts)
        # gloo reduces CPU tensors; NCCL only device tensors
        x = torch.tensor(counts, dtype=torch.int64, device=self.device)
        return self.all_reduce(x, op).tolist()

    def close(self):
        """Leave the process group (the end of a torchrun script)."""
        if self.size > 1 and self._dist.is_initialized():
            self._dist.destroy_process_group()

    def _at_exit(self):
        """Before the interpreter winds down: free what the script left in reference cycles (an LLM,
        its tensors), then leave the group if the script did not. Left to the interpreter's own
        teardown, gloo aborted the process after its last line about one run in five (`terminate
        called without an active exception`; pytorch/pytorch#179291 describes the same crash)."""
        gc.collect()
        self.close()


SINGLE = TensorParallel()  # one process: every collective the identity
