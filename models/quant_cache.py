"""Quantized weights cached on disk, so a restart does not quantize again: one safetensors file per model
and mode, written atomically, recomputed when it does not match the model."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.quant_weights import GROUP_SIZE, Int4Weight, Int8Weight, kind_of

log = logging.getLogger(__name__)

_CACHE_VERSION = 2  # bump when the cached layout changes


def cache_name(mode: str) -> str:
    """The cache file's name inside a model's cache folder."""
    return f"quant-{mode}-g{GROUP_SIZE}-v{_CACHE_VERSION}.safetensors"


def cached(
    path: Path | None, compute: Callable[[], dict[str, Int4Weight | Int8Weight]], kinds: dict[str, str]
) -> tuple[dict[str, Int4Weight | Int8Weight], bool]:
    """`compute()`, or what an earlier start saved at `path`; saved there (atomically) when it was computed.

    The file may hold more layers than `kinds` asks: loads of one model can split its layers differently (int4's
    LM head is bfloat16 where the native kernels run, int8 on PyTorch's), and each split keeps the others'
    layers, so that alternating between them does not quantize again at every start. A layer missing, or of
    another kind, is recomputed with all the rest and overwritten.
    """
    stored: dict[str, Int4Weight | Int8Weight] = {}
    if path is not None and path.exists():
        stored = _unflatten(load_file(path))
        if all(name in stored and kind_of(stored[name]) == kind for name, kind in kinds.items()):
            return {name: stored[name] for name in kinds}, True
        log.warning("quantization cache does not match the model; quantizing again", extra={"cache": str(path)})
    weights = compute()
    if path is not None and weights:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".quant-", dir=path.parent)
        os.close(fd)
        try:
            save_file(_flatten({**stored, **weights}), temp)
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
