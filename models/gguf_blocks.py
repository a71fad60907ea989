"""A GGUF file's own Q4_0 / Q4_1 blocks as int4 weights: the int4 mode serves the file's 4-bit codes as
they are (a Q4_1 block's scale d and minimum m become the kernel's scale d and zero m + 8d)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.quant import QuantizationError, quantizable
from models.quant_weights import GROUP_SIZE, INT4_OFFSET, Int4Weight

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
