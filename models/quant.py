"""Weight-only quantization: every Linear of the decoder and the LM head becomes an int8 or int4 matmul.

The matmuls are PyTorch's CPU weight-only kernels, which take bfloat16 activations:
`_weight_int8pack_mm` (one symmetric scale per output channel) and `_weight_int4pack_mm_for_cpu`
(asymmetric, one scale and offset per group of 32 inputs). Only the matmul changes: its input is cast to
bfloat16 and its output back to the model's dtype, so embeddings, norms, rotary embeddings, attention and
the KV cache run as before. A tied LM head keeps its embedding: the head module is replaced, the embedding
lookup still reads the float table. In int4 mode the head is int8 (a 4-bit head costs too much quality).

Both kernels compute each output row from its own input row alone (checked in tests/models/test_quant.py),
so batched greedy output still equals greedy output alone.

`quantize` can also fuse Linears that read one input (q, k and v; gate and up) into one module, whose one
kernel call computes their outputs side by side: models/decoder.py's forward reads them so.

Where the weights come from, best first: a GGUF file's own Q4_0 / Q4_1 blocks (int4: the file's 4-bit codes
served as they are), a cache file written by an earlier start, or quantizing the float weights now.
"""

from __future__ import annotations

import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")
ACTIVATION_DTYPE = torch.bfloat16  # what both kernels multiply their weights with
GROUP_SIZE = 32  # int4: inputs sharing one scale and offset, as in GGUF's Q4 blocks
INT4_OFFSET = 8  # the int4 kernel dequantizes code q as (q - 8) * scale + zero
_INNER_K_TILES = 2  # layout argument of the int4 packing; any K that is a multiple of 32 accepts it
_CACHE_VERSION = 2  # bump when the cached layout changes
KERNEL_ALIGNMENT = 64  # bytes: where every buffer a kernel reads starts (a cache line, an AVX-512 register)
INT4_OUT_MULTIPLE = 16  # int4: output sizes the kernel's packing accepts
INT8_WIDTH_MULTIPLE = 16  # int8: input widths padded to this, so every weight and input row stays aligned


class QuantizationError(ValueError):
    """The model cannot run in the requested mode; the message is one line."""


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


class QuantizedLinear(nn.Module, ABC):
    """y = x W^T + b with W weight-only quantized: the kernel reads bfloat16 inputs, the output is cast back.
    Each kind of weight (Int8Linear, Int4Linear) brings its kernel as `_kernel` and holds what it reads with
    `_hold`; `matmul` hands the kernel inputs it can read on every CPU."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)).to(x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel alone: x [tokens, in] bfloat16 -> x W^T [tokens, out] bfloat16, no bias."""
        return self._kernel(kernel_buffer(x))

    def _hold(self, name: str, tensor: torch.Tensor) -> None:
        """Register a buffer the kernel reads, in storage it can read (`kernel_buffer`)."""
        self.register_buffer(name, kernel_buffer(tensor))

    @abstractmethod
    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The bare kernel call on an input `kernel_buffer` has made safe."""


class Int8Linear(QuantizedLinear):
    """W in int8, one scale per output channel.

    NOTE: with 4 or more input rows the kernel's AVX-512 path (not its AVX2 one) reads 16 weight bytes and 16
    bfloat16 inputs at a time with aligned loads: every row of both must start on a 16- and a 32-byte boundary,
    or the process dies (SIGSEGV). `kernel_buffer` aligns where each buffer starts; rows stay aligned when
    `in` is a multiple of 16, so other widths are padded with zero columns (zero codes times zero inputs add
    nothing)."""

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


class Int4Linear(QuantizedLinear):
    """W in int4, one scale and zero per group of 32 inputs."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(*weight.codes.shape, bias)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), _INNER_K_TILES)
        self._hold("packed", packed)
        # The kernel's layout: [in / 32, out, 2], scale then zero.
        scale_zeros = torch.stack([weight.scales.t(), weight.zeros.t()], dim=-1)
        self._hold("scale_zeros", scale_zeros.to(torch.bfloat16))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scale_zeros)


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
) -> Outcome:
    """Replace every Linear of `model` (decoder and LM head) by its `mode` version, in place.

    In int4 mode the LM head is int8: a 4-bit head changed the first 8 greedy tokens of 6 of 12 answers on
    SmolLM2-135M, an 8-bit one of 2 (tests/models/test_quant.py), and GGUF files keep their head at 8 bits
    or more for the same reason. `file_blocks` (int4 only) maps module names to a GGUF file's own 4-bit
    weights, used as they are; the other layers are quantized now, or read from `cache_file` when an earlier
    start wrote it.

    `fuse` maps a new module name to Linears of one input whose outputs it computes side by side, in one
    kernel call (models/decoder.py's q, k, v and gate, up): those are replaced by the one module. The kernels
    compute each output column from its own weight row, so a fused module's outputs equal its parts'.
    """
    if mode == "none":
        return Outcome(mode, 0, 0, False, 0)
    targets = dict(quantizable(model))
    head = _head_name(model)
    kinds = {name: "int8" if mode == "int8" or name == head else "int4" for name in targets}
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
    made, from_cache = _cached(
        cache_file,
        lambda: {name: _quantize_one(kinds[name], linear.weight) for name, linear in rest.items()},
        {name: kinds[name] for name in rest},
    )
    weights: dict[str, Int4Weight | Int8Weight] = {**file_blocks, **made}
    biases: dict[str, torch.Tensor | None] = {name: linear.bias for name, linear in targets.items()}
    for fused, parts in (fuse or {}).items():
        if len({_kind(weights[part]) for part in parts}) != 1 or any(biases[part] is not None for part in parts):
            raise QuantizationError(f"{fused}: only Linears of one kind and without bias fuse, not {', '.join(parts)}")
        weights[fused] = _stack([weights.pop(part) for part in parts])
        biases[fused] = None
        for part in parts:
            set_module(model, part, None)
    served = 0
    for name, weight in weights.items():
        replacement = _module(weight, biases[name])
        set_module(model, name, replacement)
        served += sum(b.numel() * b.element_size() for b in replacement.buffers())
    return Outcome(mode, len(targets), len(file_blocks), from_cache, served)


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def _stack(weights: Sequence[Int4Weight | Int8Weight]) -> Int4Weight | Int8Weight:
    """One weight of `weights`' kind whose output rows are theirs, one after another: every field of both kinds
    is indexed by output row first."""
    kind = type(weights[0])
    return kind(*(torch.cat([getattr(w, f.name) for w in weights]) for f in fields(kind)))


def _kind(weight: Int4Weight | Int8Weight) -> str:
    return "int4" if isinstance(weight, Int4Weight) else "int8"


def _quantize_one(kind: str, weight: torch.Tensor) -> Int4Weight | Int8Weight:
    return quantize_int4(weight) if kind == "int4" else quantize_int8(weight)


def _module(weight: Int4Weight | Int8Weight, bias: torch.Tensor | None) -> QuantizedLinear:
    return Int4Linear(weight, bias) if isinstance(weight, Int4Weight) else Int8Linear(weight, bias)


def set_module(model: nn.Module, name: str, module: nn.Module | None) -> None:
    """Put `module` at `name`, or with None remove what is there."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if module is None:
        delattr(owner, child)
    else:
        setattr(owner, child, module)


def cache_name(mode: str) -> str:
    """The cache file's name inside a model's cache folder."""
    return f"quant-{mode}-g{GROUP_SIZE}-v{_CACHE_VERSION}.safetensors"


def _cached(
    path: Path | None, compute: Callable[[], dict[str, Int4Weight | Int8Weight]], kinds: dict[str, str]
) -> tuple[dict[str, Int4Weight | Int8Weight], bool]:
    """`compute()`, or what an earlier start saved at `path`; saved there (atomically) when it was computed.

    A cache holding other layers or kinds than `kinds` (another model's, or a different split between file
    blocks and quantized layers) is recomputed and overwritten.
    """
    if path is not None and path.exists():
        cached = _unflatten(load_file(path))
        if {name: _kind(w) for name, w in cached.items()} == kinds:
            return cached, True
        log.warning("quantization cache does not match the model; quantizing again", extra={"cache": str(path)})
    weights = compute()
    if path is not None and weights:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".quant-", dir=path.parent)
        os.close(fd)
        try:
            save_file(_flatten(weights), temp)
            os.replace(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)
    return weights, False


def _flatten(weights: dict[str, Int4Weight | Int8Weight]) -> dict[str, torch.Tensor]:
    flat = {}
    for name, w in weights.items():
        if isinstance(w, Int4Weight):
            # NOTE: two codes per byte, even input index in the low nibble; `in` is even (a multiple of 32).
            flat[f"{name}.codes"] = (w.codes[:, 0::2] | (w.codes[:, 1::2] << 4)).contiguous()
            flat[f"{name}.zeros"] = w.zeros.contiguous()
        else:
            flat[f"{name}.codes"] = w.codes.contiguous()
        flat[f"{name}.scales"] = w.scales.contiguous()
    return flat


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Int4Weight | Int8Weight]:
    names = {key.rsplit(".", 1)[0] for key in flat}
    weights: dict[str, Int4Weight | Int8Weight] = {}
    for name in names:
        codes, scales = flat[f"{name}.codes"], flat[f"{name}.scales"]
        if f"{name}.zeros" in flat:  # int4
            unpacked = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1)  # [out, in]
            weights[name] = Int4Weight(codes=unpacked, scales=scales, zeros=flat[f"{name}.zeros"])
        else:
            weights[name] = Int8Weight(codes=codes, scales=scales)
    return weights


# --- GGUF Q4_0 / Q4_1 blocks -------------------------------------------------------------------------------

_Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # fp16 scale, (Q4_1: fp16 minimum), 16 bytes of codes


def gguf_int4_blocks(path: Path, model: nn.Module) -> dict[str, Int4Weight]:
    """The Q4_0 / Q4_1 tensors of a GGUF file as int4 weights, keyed by the model's module names.

    Each is checked against the float weight transformers dequantized from the same file (already in
    `model`), so a wrong name mapping or row order is an error at load, never wrong answers.
    """
    from gguf import GGUFReader  # only GGUF models need it

    targets = dict(quantizable(model))
    names = _gguf_names(model)
    config = model.config
    weights: dict[str, Int4Weight] = {}
    for tensor in GGUFReader(str(path)).tensors:
        kind = tensor.tensor_type.name
        module = names.get(tensor.name)
        if kind not in _Q4_BLOCK_BYTES or module not in targets:
            continue
        weight = _decode_q4(np.asarray(tensor.data), kind)
        # llama.cpp stores a Llama's q and k with each head's rotary halves interleaved; transformers undoes
        # that on load (its LlamaTensorProcessor, used for model_type "llama" alone), and so does this.
        if config.model_type == "llama" and tensor.name.endswith(".attn_q.weight"):
            weight = _unpermute_rows(weight, config.num_attention_heads)
        elif config.model_type == "llama" and tensor.name.endswith(".attn_k.weight"):
            weight = _unpermute_rows(weight, config.num_key_value_heads)
        reference = targets[module].weight.detach()
        served = (weight.codes.float() - INT4_OFFSET) * weight.scales.repeat_interleave(GROUP_SIZE, 1)
        served += weight.zeros.repeat_interleave(GROUP_SIZE, 1)
        # The model's copy is rounded to its dtype (bfloat16 with --dtype bfloat16); a wrong mapping is off by
        # far more than that rounding.
        tolerance = max(1e-5, torch.finfo(reference.dtype).eps)
        if served.shape != reference.shape or not torch.allclose(served, reference.float(), rtol=tolerance, atol=tolerance / 10):
            raise QuantizationError(f"{path}: tensor {tensor.name} does not match the model's {module}")
        weights[module] = weight
    return weights


def _decode_q4(raw: np.ndarray, kind: str) -> Int4Weight:
    """Raw blocks [out, in / 32 * block bytes] uint8 -> codes, scales and zeros in the kernel's terms.

    NOTE: a block is an fp16 scale d, for Q4_1 an fp16 minimum m, then 16 bytes whose low nibbles are codes
    0..15 of the block and high nibbles codes 16..31. Q4_1 reads d * q + m, Q4_0 reads d * (q - 8); the
    kernel reads (q - 8) * scale + zero, so scale = d and zero = m + 8 d (Q4_1) or 0 (Q4_0).
    """
    block_bytes = _Q4_BLOCK_BYTES[kind]
    out_features = raw.shape[0]
    blocks = raw.reshape(out_features, -1, block_bytes)  # [out, groups, bytes]
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # [out, groups]
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        zeros = m + INT4_OFFSET * d
    else:
        zeros = torch.zeros_like(d)
    packed = torch.from_numpy(blocks[..., block_bytes - 16 :].copy())  # [out, groups, 16]
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(out_features, -1)  # [out, in]
    return Int4Weight(codes=codes, scales=d, zeros=zeros)


def _unpermute_rows(weight: Int4Weight, heads: int) -> Int4Weight:
    """Undo llama.cpp's per-head rotary permutation of output rows (as transformers does for float weights)."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[0] // heads // 2
        return t.reshape(heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    return Int4Weight(codes=rows(weight.codes), scales=rows(weight.scales), zeros=rows(weight.zeros))


def _gguf_names(model: nn.Module) -> dict[str, str]:
    """GGUF tensor name (`blk.0.attn_q.weight`) -> module name (`model.layers.0.self_attn.q_proj`)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model.config.model_type), None)
    if arch is None:
        return {}
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for module, _ in quantizable(model):
        gguf_name = name_map.get_name(module)
        if gguf_name is not None:
            names[f"{gguf_name}.weight"] = module
    return names
