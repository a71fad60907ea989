"""Float Linears on oneDNN's matmul over weights packed once into its blocked layout.

PyTorch's `F.linear` on CPU calls MKL, which on a decode step (a few rows against a weight of hundreds of
thousands of values) reads SmolLM2-135M's float32 weights at about 11 GB/s on a 2-core AVX-512 EPYC, a third
of what the machine streams (32 GB/s, `torch.sum` over 540 MB). oneDNN, also inside PyTorch, reads a weight
reordered once for it (`mkldnn._reorder_linear_weight`) at 17 to 25 GB/s from 1 row to 8, and at 32 rows
does 2.2 times MKL's FLOPs: 26 ms instead of 47 for every matmul of a one-row float32 step, 54 instead of 121
at 32 rows; in bfloat16 15 and 29 ms (measured with bench.step_profile's shapes, 2 threads).

Batch invariance: a packed weight computes each output row from its own input row with one accumulation
order whatever the number of rows (tests/models/test_packed.py), as long as it was packed for 8 rows or
more; MKL's float32 path does not (a row can move by an ulp between 1 and 4 rows).
"""

from __future__ import annotations

import torch
from torch import nn

from models.quant import set_module

# The row count oneDNN packs for. Any count of 8 or more gives every row the same accumulation order for
# every number of rows; the speed differs by under 10% between 8 and 64 at every batch size measured.
PACKED_FOR_ROWS = 32
DTYPES = (torch.float32, torch.bfloat16)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this PyTorch build can run packed matmuls for weights on `device` in `dtype`."""
    return device.type == "cpu" and dtype in DTYPES and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x W^T + b, W held in oneDNN's layout (an opaque tensor: only this module's forward reads it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS))
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear, in place; returns how many. A tied LM head is
    packed too: the embedding keeps its own table for the lookup."""
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in linears:
        set_module(model, name, PackedLinear(linear))
    return len(linears)
