"""Weight-only quantization: every Linear of the decoder and the LM head becomes an int8 or int4 matmul.

Two sets of kernels serve them. Where models/native.cpp loaded (the loader passes `native_kernels`),
tokenferry's own: `int8_linear` and `int4_linear` over codes in panels (Int8PanelLinear, Int4PanelLinear),
which take the model's dtype as it is and sum in float32. Otherwise PyTorch's CPU weight-only kernels, which take bfloat16
activations: `_weight_int8pack_mm` (one symmetric scale per output channel) and `_weight_int4pack_mm_for_cpu`
(asymmetric, one scale and offset per group of 32 inputs); their input is cast to bfloat16 and their output
back (Int8Linear, Int4Linear). Only the matmuls change: embeddings, norms, rotary embeddings, attention and the
KV cache run as before. A tied LM head keeps its embedding: the head module is replaced, the embedding lookup
still reads the float table. In int4 mode the head is int8 (a 4-bit head costs too much quality), or left to
the loader, which serves it on bfloat16 panels where the native library loaded.

Every kernel computes each output row from its own input row alone (checked in tests/models/test_quant.py),
so batched greedy output still equals greedy output alone.

`quantize` can also fuse Linears that read one input (q, k and v; gate and up) into one module, whose one
kernel call computes their outputs side by side: models/decoder.py's forward reads them so.

Where the weights come from, best first: a GGUF file's own Q4_0 / Q4_1 blocks (models/gguf_blocks.py; int4:
the file's 4-bit codes served as they are), a cache file written by an earlier start (models/quant_cache.py),
or quantizing the float weights now (models/quant_weights.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import native
from models.quant_cache import cached
from models.quant_weights import GROUP_SIZE, Int4Weight, Int8Weight, kind_of, quantize_int4, quantize_int8, stack

MODES = ("none", "int8", "int4")
ACTIVATION_DTYPE = torch.bfloat16  # what both kernels multiply their weights with
_INNER_K_TILES = 2  # layout argument of the int4 packing; any K that is a multiple of 32 accepts it
KERNEL_ALIGNMENT = 64  # bytes: where every buffer a kernel reads starts (a cache line, an AVX-512 register)
INT4_OUT_MULTIPLE = 16  # int4: output sizes the kernel's packing accepts
INT8_WIDTH_MULTIPLE = 16  # int8: input widths padded to this, so every weight and input row stays aligned


class QuantizationError(ValueError):
    """The model cannot run in the requested mode; the message is one line."""


class QuantizedLinear(nn.Module, ABC):
    """y = x W^T + b with W weight-only quantized; x and y in the model's dtype. `kind` is int8 or int4."""

    kind: str

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)  # [..., in] -> [..., out]
        return out if self.bias is None else out + self.bias

    @abstractmethod
    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias: [..., in] -> [..., out], in x's dtype."""

    def native_weights(self) -> tuple[torch.Tensor, ...] | None:
        """The weights as models/native.cpp's `decoder_layer` takes a projection; None if it cannot."""
        return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TorchQuantizedLinear(QuantizedLinear):
    """On one of PyTorch's weight-only kernels, which read bfloat16 inputs: the input is cast to bfloat16 and
    the output back. Each kind (Int8Linear, Int4Linear) brings its kernel as `_kernel` and holds what it reads
    with `_hold`; `matmul` hands the kernel inputs it can read on every CPU."""

    def product(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel alone: x [tokens, in] bfloat16 -> x W^T [tokens, out] bfloat16, no bias."""
        return self._kernel(kernel_buffer(x))

    def _hold(self, name: str, tensor: torch.Tensor) -> None:
        """Register a buffer the kernel reads, in storage it can read (`kernel_buffer`)."""
        self.register_buffer(name, kernel_buffer(tensor))

    @abstractmethod
    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The bare kernel call on an input `kernel_buffer` has made safe."""


class Int8Linear(TorchQuantizedLinear):
    """W in int8, one scale per output channel.

    NOTE: with 4 or more input rows the kernel's AVX-512 path (not its AVX2 one) reads 16 weight bytes and 16
    bfloat16 inputs at a time with aligned loads: every row of both must start on a 16- and a 32-byte boundary,
    or the process dies (SIGSEGV). `kernel_buffer` aligns where each buffer starts; rows stay aligned when
    `in` is a multiple of 16, so other widths are padded with zero columns (zero codes times zero inputs add
    nothing)."""

    kind = "int8"

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None) -> None:
        super().__init__(*weight.codes.shape, bias)
        self.padding = -self.in_features % INT8_WIDTH_MULTIPLE
        codes = F.pad(weight.codes, (0, self.padding)) if self.padding else weight.codes
        self._hold("codes", codes)  # [out, in + padding] int8
        self._hold("scales", weight.scales.to(torch.bfloat16))  # [out]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding:
            x = F.pad(x, (0, self.padding))  # a fresh tensor: aligned
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)


class Int4Linear(TorchQuantizedLinear):
    """W in int4, one scale and zero per group of 32 inputs."""

    kind = "int4"

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(*weight.codes.shape, bias)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), _INNER_K_TILES)
        self._hold("packed", packed)
        # The kernel's layout: [in / 32, out, 2], scale then zero.
        scale_zeros = torch.stack([weight.scales.t(), weight.zeros.t()], dim=-1)
        self._hold("scale_zeros", scale_zeros.to(torch.bfloat16))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scale_zeros)


class Int8PanelLinear(QuantizedLinear):
    """W in int8 as Int8Linear, on models/native.cpp's `int8_linear`: the codes in panels of V output columns,
    multiplied in float32 with the input as it is (no bfloat16 rounding), each row alone."""

    kind = "int8"

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None) -> None:
        super().__init__(*weight.codes.shape, bias)
        width = native.width()
        # NOTE: as float32 panels (models/packed.py): panel p holds columns [p V, (p + 1) V), k-major.
        panels = weight.codes.view(-1, width, self.in_features).transpose(1, 2)
        self.register_buffer("codes", panels.contiguous())  # [out / V, in, V] int8
        self.register_buffer("scales", weight.scales.float().contiguous())  # [out]

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenferry.int8_linear(x, self.codes, self.scales)

    def native_weights(self) -> tuple[torch.Tensor, ...] | None:
        return (self.codes, self.scales) if self.bias is None else None


class Int4PanelLinear(QuantizedLinear):
    """W in int4 as Int4Linear, on models/native.cpp's `int4_linear`: the codes two to a byte in panels of V
    output columns; the input is rounded to bfloat16 as for PyTorch's kernel, the output is the input's dtype."""

    kind = "int4"

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(*weight.codes.shape, bias)
        width, k = native.width(), self.in_features
        # NOTE: panel p holds columns [p V, (p + 1) V) in blocks of 8 k, 4 V bytes each, two codes to a byte:
        # the byte at 16 (j / 4) + 8 h + 2 (j % 4) + t of a block holds column j's code for k0 + 2 h + t in its
        # low nibble and for k0 + 4 + 2 h + t in its high one, the order in which models/native.cpp's
        # `widen_block` turns one load into bfloat16 pairs. So k = 8 block + 4 nibble + 2 h + t, and j = 4 a + b.
        codes = weight.codes.view(-1, width // 4, 4, k // 8, 2, 2, 2)  # [panel, a, b, block, nibble, h, t]
        packed = codes[..., 0, :, :] | codes[..., 1, :, :] << 4  # [panel, a, b, block, h, t]
        self.register_buffer("codes", packed.permute(0, 3, 1, 4, 2, 5).contiguous().view(-1, k // 2, width))
        # Scales and zeros per group of 32 k: [out / V, in / 32, 2, V], the group's V scales then its V zeros.
        scales, zeros = (t.to(torch.bfloat16).view(-1, width, k // GROUP_SIZE).transpose(1, 2) for t in (weight.scales, weight.zeros))
        self.register_buffer("scale_zeros", torch.stack([scales, zeros], dim=2).contiguous())

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tokenferry.int4_linear(x, self.codes, self.scale_zeros)

    def native_weights(self) -> tuple[torch.Tensor, ...] | None:
        return (self.codes, self.scale_zeros) if self.bias is None else None


def kernel_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it, contiguous and alone in storage that starts on a KERNEL_ALIGNMENT boundary.

    Every buffer and input a quantized kernel reads passes through here. A view into a larger buffer (a
    safetensors file mapped at an offset, a slice of a wider tensor) can start anywhere, and `.contiguous()`
    keeps that address; a fresh allocation starts where PyTorch's CPU allocator puts it, which is 64-byte
    aligned. The check after the copy fails loudly on every CPU if that ever stops being true, instead of
    crashing on the CPUs whose kernel paths use aligned loads.
    """
    nbytes = tensor.numel() * tensor.element_size()
    alone = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == nbytes
    if not (tensor.is_contiguous() and alone and tensor.data_ptr() % KERNEL_ALIGNMENT == 0):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    if tensor.data_ptr() % KERNEL_ALIGNMENT:
        raise RuntimeError(f"a fresh {nbytes}-byte buffer starts at {tensor.data_ptr():#x}, not on a {KERNEL_ALIGNMENT}-byte boundary")
    return tensor


def quantizable(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The Linear layers to replace: every one in the decoder, and the LM head."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


def check_supported(mode: str, device: torch.device) -> None:
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; expected one of {', '.join(MODES)}")
    if mode != "none" and device.type != "cpu":
        raise QuantizationError(
            f"--quantization {mode} runs on CPU only (PyTorch's weight-only kernels _weight_int8pack_mm and "
            f"_weight_int4pack_mm_for_cpu are CPU kernels); use --device cpu or --quantization none"
        )


@dataclass(frozen=True)
class Outcome:
    """What `quantize` did, for the load log."""

    mode: str
    layers: int
    from_file: int  # int4 layers whose codes are the GGUF file's own blocks
    from_cache: bool
    bytes: int  # weight bytes of the replaced layers, as served


def quantize(
    model: nn.Module,
    mode: str,
    file_blocks: dict[str, Int4Weight] | None = None,
    cache_file: Path | None = None,
    fuse: Mapping[str, Sequence[str]] | None = None,
    native_kernels: bool = False,
    head: bool = True,
) -> Outcome:
    """Replace every Linear of `model` (decoder and LM head) by its `mode` version, in place; with `head` False
    the LM head stays as it is (models/loader.py serves int4's on bfloat16 panels where the library loaded).

    In int4 mode the LM head is int8: a 4-bit head changed the first 8 greedy tokens of 6 of 12 answers on
    SmolLM2-135M, an 8-bit one of 2 (tests/models/test_quant.py), and GGUF files keep their head at 8 bits
    or more for the same reason. `file_blocks` (int4 only) maps module names to a GGUF file's own 4-bit
    weights, used as they are; the other layers are quantized now, or read from `cache_file` when an earlier
    start wrote it.

    `fuse` maps a new module name to Linears of one input whose outputs it computes side by side, in one
    kernel call (models/decoder.py's q, k, v and gate, up): those are replaced by the one module. The kernels
    compute each output column from its own weight row, so a fused module's outputs equal its parts'.

    `native_kernels` (models/native.cpp is loaded): layers whose outputs fill whole panels run on its int8 and int4
    kernels (Int8PanelLinear, Int4PanelLinear), the others on PyTorch's.
    """
    if mode == "none":
        return Outcome(mode, 0, 0, False, 0)
    head_name = output_name(model)
    targets = {name: linear for name, linear in quantizable(model) if head or name != head_name}
    kinds = {name: "int8" if mode == "int8" or name == head_name else "int4" for name in targets}
    file_blocks = {name: w for name, w in (file_blocks or {}).items() if kinds.get(name) == "int4"}
    for name, weight in file_blocks.items():
        expected = tuple(targets[name].weight.shape)
        if tuple(weight.codes.shape) != expected:
            raise QuantizationError(f"{name}: the file's blocks are {tuple(weight.codes.shape)}, the model's weight {expected}")
    rest = {name: linear for name, linear in targets.items() if name not in file_blocks}
    for name, linear in rest.items():
        if kinds[name] == "int4" and linear.in_features % GROUP_SIZE:
            raise QuantizationError(f"{name}: int4 needs input sizes that are multiples of {GROUP_SIZE}, got {linear.in_features}")
        if kinds[name] == "int4" and linear.out_features % INT4_OUT_MULTIPLE:
            raise QuantizationError(f"{name}: int4 needs output sizes that are multiples of {INT4_OUT_MULTIPLE}, got {linear.out_features}")
    made, from_cache = cached(
        cache_file,
        lambda: {name: _quantize_one(kinds[name], linear.weight) for name, linear in rest.items()},
        {name: kinds[name] for name in rest},
    )
    weights: dict[str, Int4Weight | Int8Weight] = {**file_blocks, **made}
    biases: dict[str, torch.Tensor | None] = {name: linear.bias for name, linear in targets.items()}
    for fused, parts in (fuse or {}).items():
        if len({kind_of(weights[part]) for part in parts}) != 1 or any(biases[part] is not None for part in parts):
            raise QuantizationError(f"{fused}: only Linears of one kind and without bias fuse, not {', '.join(parts)}")
        weights[fused] = stack([weights.pop(part) for part in parts])
        biases[fused] = None
        for part in parts:
            set_module(model, part, None)
    served = 0
    for name, weight in weights.items():
        replacement = _module(weight, biases[name], native_kernels)
        set_module(model, name, replacement)
        served += sum(b.numel() * b.element_size() for b in replacement.buffers())
    return Outcome(mode, len(targets), len(file_blocks), from_cache, served)


def output_name(model: nn.Module) -> str | None:
    """The LM head's module name, if the model names one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def _quantize_one(kind: str, weight: torch.Tensor) -> Int4Weight | Int8Weight:
    return quantize_int4(weight) if kind == "int4" else quantize_int8(weight)


def _module(weight: Int4Weight | Int8Weight, bias: torch.Tensor | None, native_kernels: bool) -> QuantizedLinear:
    panels = native_kernels and weight.codes.shape[0] % native.width() == 0
    if isinstance(weight, Int4Weight):
        return Int4PanelLinear(weight, bias) if panels else Int4Linear(weight, bias)
    return Int8PanelLinear(weight, bias) if panels else Int8Linear(weight, bias)


# Where models/decoder.py's forward keeps what it read of a model's layers, in the model's __dict__.
LAYERS_READ = "_tokenferry_layers"


def set_module(model: nn.Module, name: str, module: nn.Module | None) -> None:
    """Put `module` at `name`, or with None remove what is there. Drops what models/decoder.py's forward read of
    the model's layers, so its next forward reads them again."""
    model.__dict__.pop(LAYERS_READ, None)
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if module is None:
        delattr(owner, child)
    else:
        setattr(owner, child, module)
