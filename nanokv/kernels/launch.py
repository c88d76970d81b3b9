"""What the Triton kernels' wrappers decide at launch: how exact the dots are, and how many
programs fill the device.

Tensor cores multiply bf16/fp16 tiles and accumulate in float32: that is how the kernels run on
a GPU. Two cases keep float32 tiles and exact ("ieee") dots instead: a float32 cache (tl.dot
would round it to tf32), and Triton's interpreter on CPU, whose half-precision dots and
arithmetic are wrong unless upcast.
"""

from __future__ import annotations

import functools
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETER_SMS = 8  # under the interpreter there is no device to fill: enough to exercise split-K


def exact_dots(dtype: torch.dtype) -> bool:
    """Upcast tiles to float32 and take exact dots (the kernels' UPCAST constexpr)?"""
    return INTERPRETED or dtype == torch.float32


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    """The streaming multiprocessors of `device` (132 on an H100 / H200)."""
    if INTERPRETED or not str(device).startswith("cuda"):
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs: int, tokens: int, device, min_split_tokens: int = 256, max_splits: int = 64) -> int:
    """Splits of a decode's keys per head (split-K) so that `programs` (sequences x kv-heads)
    times the splits fill the device about twice over, while every split keeps at least
    `min_split_tokens` keys (below that its fixed cost, loading q and writing a partial, is
    not worth it). B=1 at 4k then spreads over 16 splits; B=32 x 8 kv-heads already fills 132
    SMs and runs as 1-2."""
    wanted = -(-2 * num_sms(device) // max(1, programs))
    return max(1, min(wanted, tokens // min_split_tokens, max_splits))
