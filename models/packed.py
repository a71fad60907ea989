"""Float Linears on weights packed once for a kernel: in panels for models/native.cpp's `panel_linear` where
that library loaded, otherwise in oneDNN's blocked layout.

float32, one decode step of SmolLM2-135M's matmuls at 1 / 8 / 32 rows on a 2-core AVX-512 EPYC, 2 threads:
panels 16.7 / 16.5 / 45.4 ms, oneDNN 25.2 / 25.5 / 50.6 ms. At one row the panels stream the 540 MB of
weights at 32 GB/s, the machine's rate; oneDNN reads them at 21. In bfloat16 the whole decode step takes
14 / 18 / 39 ms against oneDNN's 25 / 29 / 55. Each output is one chain of multiply-adds whatever the row
count (models/native.cpp), so batch invariance holds by construction.

PyTorch's `F.linear` on CPU calls MKL, which on a decode step (a few rows against a weight of hundreds of
thousands of values) reads SmolLM2-135M's float32 weights at about 11 GB/s on a 2-core AVX-512 EPYC, a third
of what the machine streams (32 GB/s, `torch.sum` over 540 MB). oneDNN, also inside PyTorch, reads a weight
reordered once for it (`mkldnn._reorder_linear_weight`) at 17 to 25 GB/s from 1 row to 8, and at 32 rows
does 2.2 times MKL's FLOPs: 26 ms instead of 47 for every matmul of a one-row float32 step, 54 instead of 121
at 32 rows; in bfloat16 15 and 29 ms (measured with bench.step_profile's shapes, 2 threads).

Batch invariance: oneDNN's packed weight computes each output row from its own input row with one accumulation
order whatever the number of rows (tests/models/test_packed.py), as long as it was packed for 8 rows or
more; MKL's float32 path does not (a row can move by an ulp between 1 and 4 rows).
"""

from __future__ import annotations

import torch
from torch import nn

from models import native
from models.quant import set_module

# The row count oneDNN packs for. Any count of 8 or more gives every row the same accumulation order for
# every number of rows; the speed differs by under 10% between 8 and 64 at every batch size measured.
PACKED_FOR_ROWS = 32
DTYPES = (torch.float32, torch.bfloat16)


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN, inside this PyTorch, packs a weight of `dtype` on this CPU: float32 wherever it is built
    in, bfloat16 only with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT (elsewhere, an AVX2-only EPYC for one, its
    reorder raises)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


class PanelLinear(nn.Module):
    """y = x W^T in float32 or bfloat16, W in `panel_linear`'s panels [out / V, in, V] (V: the library's width);
    `dtype`: the panels' dtype, by default the Linear's."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not panels_fit(linear, dtype):
            raise ValueError(f"{linear} does not fit panel_linear in {dtype} (models/packed.py, panels_fit)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(dtype or linear.weight.dtype)  # [out, in]
        width, k = native.width(), self.in_features
        # NOTE: panel p holds output columns [p V, (p + 1) V) in k order, so a tile reads it in one pass: float32
        # as [k][column]; bfloat16 as [k / 2][column][2], each column's pair of k side by side, which the
        # bfloat16 dot product reads. Either way the buffer is [out / V, in, V].
        if weight.dtype == torch.float32:
            panels = weight.view(-1, width, k).transpose(1, 2)
        else:
            panels = weight.view(-1, width, k // 2, 2).permute(0, 2, 1, 3)
        self.register_buffer("panels", panels.contiguous().view(-1, k, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenferry.panel_linear(x, self.panels)  # [..., in] -> [..., out]

    def native_weights(self) -> tuple[torch.Tensor, ...] | None:
        """The weights as models/native.cpp's `decoder_layer` takes a projection."""
        return (self.panels,)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class Bfloat16PanelLinear(PanelLinear):
    """A float Linear served on bfloat16 panels whatever the model's dtype: the input rounded to bfloat16, the
    output widened back to the input's dtype. int4 mode's LM head where the library has a native bfloat16 dot
    product (models/loader.py): it reads 57 MB a step where the int8 head reads 28, and yet measured against it
    on SmolLM2's int4 step, both in one process, alternating: 9.0 against 9.3 ms at one row, 50 against 54 ms at
    32 rows (the int8 kernel multiplies in float32, half the bfloat16 dot product's rate), on a 2-core AVX-512
    EPYC with AVX512-BF16. Without it (AVX2) both widen to float32 and the int8 head wins: 1.8 against 2.8 ms
    at one row, 14 against 18 at 32 rows, on a 2-core AVX2 Zen 3 EPYC."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.bfloat16)).to(x.dtype)  # [..., in] -> [..., out]

    def native_weights(self) -> None:
        return None  # the casts around the product are not the kernel's


def panels_fit(linear: nn.Linear, dtype: torch.dtype | None = None) -> bool:
    """Whether `linear`, in `dtype` (default its own), can run on `panel_linear` (the library must be loaded:
    `native.load`): no bias, whole panels, and in bfloat16 whole pairs of inputs."""
    weight, dtype = linear.weight, dtype or linear.weight.dtype
    return (
        weight.device.type == "cpu"
        and dtype in DTYPES
        and linear.bias is None
        and linear.out_features % native.width() == 0
        and (dtype == torch.float32 or linear.in_features % 2 == 0)
    )


def pack(model: nn.Module, panels: bool = False) -> int:
    """Replace every nn.Linear of `model` on CPU by a PanelLinear (`panels`, where it fits) or else a
    PackedLinear (where oneDNN packs its dtype), in place; returns how many. A Linear neither takes stays as it
    is, on F.linear. A tied LM head is packed too: the embedding keeps its own table for the lookup."""
    count = 0
    for name, linear in [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]:
        if linear.weight.device.type != "cpu":
            continue
        if panels and panels_fit(linear):
            set_module(model, name, PanelLinear(linear))
        elif onednn_packs(linear.weight.dtype):
            set_module(model, name, PackedLinear(linear))
        else:
            continue
        count += 1
    return count
