"""engine/upload.py: a decode step's host inputs packed into one buffer and sent in one copy,
each coming back with its dtype, shape and values (checked on CPU with packing forced on)."""

import torch

from nanokv.engine.upload import HostToDevice


def test_tensors_come_back_whole_from_one_copy():
    send = HostToDevice("cpu", pack=True)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.arange(5), torch.randint(0, 9, (2, 3, 4), generator=gen, dtype=torch.int32),
               torch.rand(7, generator=gen) < 0.5, torch.randn(3, 5, generator=gen).half().t(),  # not contiguous
               torch.empty(0, dtype=torch.int64), torch.tensor(3.5, dtype=torch.float64)]
    out = send(tensors)
    assert send.copies == 1 and len(out) == len(tensors)
    for t, o in zip(tensors, out):
        assert o.dtype == t.dtype and o.shape == t.shape and torch.equal(o, t)
        assert t.numel() == 0 or o.data_ptr() != t.data_ptr()  # a copy, not the host tensor
    # views into one block: each starts 16-byte aligned
    assert all(o.data_ptr() % 16 == 0 for o in out if o.numel())
    again = send([torch.arange(100000), tensors[1]])  # a bigger step grows the buffer
    assert send.copies == 2 and torch.equal(again[0], torch.arange(100000)) and torch.equal(again[1], tensors[1])
    assert torch.equal(out[0], torch.arange(5)), "an earlier step's inputs stay as they were sent"


def test_on_cpu_nothing_is_copied():
    send = HostToDevice("cpu")
    tensors = [torch.arange(4), torch.ones(2, 2)]
    assert all(o is t for o, t in zip(send(tensors), tensors)) and send.copies == 0
