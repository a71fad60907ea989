"""Weight-only quantized weights as plain tensors: int8 (one symmetric scale per output channel) and int4
(a scale and a zero per group of 32 inputs), how float weights become them, and how several stack into one.
The layers that serve them are models/quant.py's."""

from __future__ import annotations

from dataclasses import dataclass, fields
from collections.abc import Sequence

import torch

GROUP_SIZE = 32  # int4: inputs sharing one scale and offset, as in GGUF's Q4 blocks
INT4_OFFSET = 8  # the int4 kernel dequantizes code q as (q - 8) * scale + zero


@dataclass(frozen=True)
class Int4Weight:
    """Codes in 0..15, one scale and one zero per group: weight = (code - 8) * scale + zero."""

    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [out, in / 32] float32
    zeros: torch.Tensor  # [out, in / 32] float32

    def dequantize(self) -> torch.Tensor:
        """The float weight the kernel serves, with scales and zeros rounded to bfloat16 as it reads them."""
        scales = self.scales.to(torch.bfloat16).float().repeat_interleave(GROUP_SIZE, dim=1)
        zeros = self.zeros.to(torch.bfloat16).float().repeat_interleave(GROUP_SIZE, dim=1)
        return (self.codes.float() - INT4_OFFSET) * scales + zeros  # [out, in]


@dataclass(frozen=True)
class Int8Weight:
    """Symmetric per output channel: weight = code * scale."""

    codes: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] float32


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per output channel: the largest magnitude of each row maps to 127."""
    weight = weight.detach().float()  # [out, in]
    # Rounded to bfloat16 before use, so the codes are chosen for the scale the kernel will read.
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16).float()  # [out]
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes=codes, scales=scales)


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Asymmetric, groups of 32 inputs: each group's minimum to maximum spans the codes 0..15."""
    weight = weight.detach().float()  # [out, in]
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)  # [out, in / 32, 32]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, in / 32]
    # Scale and zero rounded to bfloat16 first, so the codes are chosen for the values the kernel will read.
    scales = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
    zeros = (low + INT4_OFFSET * scales).to(torch.bfloat16).float()
    codes = torch.round((groups - zeros[..., None]) / scales[..., None]) + INT4_OFFSET
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(out_features, in_features)
    return Int4Weight(codes=codes, scales=scales, zeros=zeros)


def stack(weights: Sequence[Int4Weight | Int8Weight]) -> Int4Weight | Int8Weight:
    """One weight of `weights`' kind whose output rows are theirs, one after another: every field of both kinds
    is indexed by output row first."""
    kind = type(weights[0])
    return kind(*(torch.cat([getattr(w, f.name) for w in weights]) for f in fields(kind)))


def kind_of(weight: Int4Weight | Int8Weight) -> str:
    return "int4" if isinstance(weight, Int4Weight) else "int8"
