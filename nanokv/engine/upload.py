"""HostToDevice: what a decode step sends from the host to the GPU, in one copy.

A decode step's inputs are made on the host, where the scheduler and the block tables live: the
new tokens' ids and positions, the edits to the tables' device mirror, each group's rows of it and
lengths (and a method's budgets; the slots, where the host works them out). Sent one by one with `.to(device)`, each would be a copy from
pageable memory, which torch follows with a wait for the GPU to finish everything queued before
it: six or more stalls a step. Here they are packed into one pinned byte buffer and sent with one
non-blocking copy, so the step's kernels queue behind it and the host runs ahead.

The buffer is reused from step to step. Before packing into it again, the host waits for the
previous copy out of it (an event), which has long finished: every step ends by reading its
sampled tokens back, after everything the step queued.
"""

from __future__ import annotations

import torch

ALIGN = 16  # bytes: each tensor starts where any dtype's view of it is aligned


class HostToDevice:
    def __init__(self, device, pack: bool | None = None):
        """`pack` (default: on a GPU) packs and copies; off, host tensors are returned as they are
        (on CPU they are where the step needs them). The tests pack on CPU to check the layout."""
        self.device = torch.device(device)
        self.pack = self.device.type != "cpu" if pack is None else pack
        self.buffer: torch.Tensor | None = None
        self.sent: torch.cuda.Event | None = None
        self.copies = 0  # how many copies this has made (the tests count them)

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the device, in order: those on the host sent in one copy, the others
        (already there) as they are."""
        host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
        if not self.pack or not host:
            return tensors
        sizes = [tensors[i].numel() * tensors[i].element_size() for i in host]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // ALIGN) * ALIGN)
        buffer = self._host_buffer(offsets[-1])
        for i, offset, size in zip(host, offsets, sizes):
            buffer[offset:offset + size] = tensors[i].contiguous().view(-1).view(torch.uint8)
        on_device = buffer[:offsets[-1]].to(self.device, non_blocking=True, copy=True)
        if self.device.type == "cuda":
            self.sent = torch.cuda.Event()
            self.sent.record()
        self.copies += 1
        out = list(tensors)
        for i, offset, size in zip(host, offsets, sizes):
            t = tensors[i]
            out[i] = on_device[offset:offset + size].view(t.dtype).view(t.shape)
        return out

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        """The reused byte buffer, pinned on a GPU machine, grown to at least `nbytes`."""
        if self.sent is not None:
            self.sent.synchronize()  # the last copy out of it is done (see the module docstring)
        if self.buffer is None or len(self.buffer) < nbytes:
            pinned = self.device.type == "cuda"
            self.buffer = torch.empty(max(nbytes, 2 * len(self.buffer) if self.buffer is not None else 1 << 16),
                                      dtype=torch.uint8, device="cpu", pin_memory=pinned)
        return self.buffer
