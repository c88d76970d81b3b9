"""bfloat16 linear layers on CPU with weights pre-packed for oneDNN.

`F.linear` on a plain bfloat16 weight re-lays the weight out for the CPU's bfloat16 dot
products at every call. Packing it once into oneDNN's blocked layout (what torch.compile's
CPU backend does when it freezes weights, and vLLM's CPU backend does at load) removes that:
a batch-1 decode step's matmuls ran 2-3x faster here (576x3072: 119 -> 49 us; the 49152-row
output head: 4.7 -> 1.5 ms), a 64-token step's 1.2-1.4x. The result is bit-identical to
`F.linear` in bfloat16 (tests/test_models.py checks it); float32 would round differently, so
float32 stays plain and its logits stay comparable to transformers' to the last bits.

The packed weight is an opaque oneDNN tensor: it cannot be indexed or copied into, so packing
comes after the weights are loaded. A tied output head gets its own packed copy (the embedding
lookup still reads the plain matrix).

A decode step of one to four sequences is a matrix-vector product, bound by how fast the weights
stream from memory. oneDNN's blocked layout reached 16-18 GB/s here; a plain loop over the
row-major weight with the next rows prefetched (nanokv/kernels/cpu_gemv.cpp) 20-24 GB/s: batch-1 decode
went from ~33 to ~40 tokens/s. So a layer may also keep its plain weight (`keep_rows`), which the
loader does where that second copy fits easily (nanokv/loading.py). That path sums in another
order, so its bfloat16 result may differ from F.linear's in the last bit.
"""

import torch
from torch import nn

from nanokv.hardware import onednn_packs_bfloat16
from nanokv.kernels import cpu

GEMV_MAX_ROWS = 4  # up to this many rows of x, the matrix-vector kernel; beyond, oneDNN


def can_pack(dtype: torch.dtype, device) -> bool:
    """bfloat16 on a CPU whose oneDNN packs it (elsewhere torch raises; plain F.linear serves)."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu" and onednn_packs_bfloat16()


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, keep_rows: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()
        # the plain weight too, for a few rows of x (the kernel reads K in steps of 32)
        self.rows = linear.weight.detach().contiguous() if keep_rows and self.in_features % 32 == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS:
            return cpu.gemv(x, self.rows, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")


@torch.no_grad()
def pack_linears(model: nn.Module, keep_rows: bool = False) -> nn.Module:
    """Swap every nn.Linear of `model` for a PackedLinear (in place), keeping the plain weights
    for the matrix-vector kernel too with `keep_rows`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, keep_rows))
    return model

