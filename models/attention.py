"""The model's attention: transformers' SDPA, plus one forward over several parts of the batch at once.

A decode step and a chunk of a long prompt are different shapes (running rows of one query each, one row
of many queries, each over its own cached columns), but their matrix products need not be: flattened into
one sequence of tokens, every projection and MLP reads the weights once for both. Only attention must keep
them apart. `Parts` is what a flattened forward's cache hands the attention (models/kv_cache.py,
`flat_cache`): each part's keys, values and mask, as SDPA would get them alone; `attend` runs each part's
SDPA on its own queries, so every part computes exactly what it would in a forward of its own.

`attend_native` (NATIVE) is the same on models/native.cpp's `attention`, in float32 or bfloat16 on CPU where
the library loaded (models/loader.py chooses). It reads each key-value head once for its query heads and only
the columns a query's mask keeps, in order: a decode step runs 2.5 times SDPA's speed at 32 rows of 150 columns
on a 2-core AVX-512 EPYC (0.26 against 0.66 ms a layer), and every query's output is the same bits whatever
its batch's padding or its prompt's chunking, in every dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The attn_implementation models are loaded with (models/loader.py, models/tiny.py).
NAME = "tokenferry_sdpa"
# What the loader switches a model to on CPU once models/native.cpp loaded; models/decoder.py then runs its
# norms and MLP activation there too.
NATIVE = "tokenferry_native"
MAX_GROUP, MAX_HEAD_DIM = 16, 256  # the native attention's bounds: query heads per key-value head, head size


@dataclass(frozen=True)
class Span:
    """Where one part of a flattened forward sits: `rows` rows of `q` tokens each, `[at, at + rows * q)`, row-major."""

    at: int
    rows: int
    q: int
    mask: torch.Tensor  # [rows, 1, q, cols] bool, True where a query may attend

    @property
    def tokens(self) -> slice:
        return slice(self.at, self.at + self.rows * self.q)


@dataclass(frozen=True)
class Part:
    """One part's keys and values in one layer, as SDPA would get them in a forward of its own."""

    span: Span
    keys: torch.Tensor  # [rows, kv_heads, cols, head_dim]
    values: torch.Tensor  # [rows, kv_heads, cols, head_dim]


@dataclass(frozen=True)
class Parts:
    """Stands for the keys (and the values) of one layer of a flattened forward."""

    parts: tuple[Part, ...]


def unflatten(states: torch.Tensor, span: Span) -> torch.Tensor:
    """[1, heads, tokens, dim] states of a flattened forward -> span's own [rows, heads, q, dim].

    NOTE: a span's tokens are row-major, so viewing them as [heads, rows, q, dim] and moving rows first
    gives each row its own q tokens, in order.
    """
    heads, dim = states.shape[1], states.shape[3]
    return states[0, :, span.tokens].view(heads, span.rows, span.q, dim).transpose(0, 1)


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | Parts,
    value: torch.Tensor | Parts,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; for a flattened forward (`key` is `Parts`), SDPA per part.

    query: [batch, heads, q, head_dim]; returns [batch, q, heads, head_dim] as transformers' functions do.
    """
    return _each_part(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)


def attend_native(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | Parts,
    value: torch.Tensor | Parts,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """`attend` on models/native.cpp's `attention` (the library must be loaded)."""
    return _each_part(_native_or_sdpa, module, query, key, value, attention_mask, **kwargs)


def _each_part(
    one: Callable[..., tuple[torch.Tensor, None]],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | Parts,
    value: torch.Tensor | Parts,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    if not isinstance(key, Parts):
        return one(module, query, key, value, attention_mask, **kwargs)
    heads, dim = query.shape[1], query.shape[3]
    outputs = []
    for part in key.parts:
        span = part.span
        mine = unflatten(query, span)  # [rows, heads, q, dim]
        out, _ = one(module, mine, part.keys, part.values, span.mask, **kwargs)
        outputs.append(out.reshape(span.rows * span.q, heads, dim))  # out: [rows, q, heads, dim]
    return torch.cat(outputs)[None], None  # [1, tokens, heads, dim]


def _native_or_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    rows, _, q, _ = query.shape  # [rows, heads, q, dim]
    plain = attention_mask is not None and attention_mask.dtype == torch.bool and not kwargs.get("dropout")
    if not plain or query.dtype not in (torch.float32, torch.bfloat16) or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = attention_mask[:, 0].expand(rows, q, key.shape[2]).contiguous()  # [rows, q, cols]
    return torch.ops.tokenferry.attention(query, key, value, mask, float(kwargs["scaling"])), None  # [rows, q, heads, dim]


AttentionInterface.register(NAME, attend)
AttentionInterface.register(NATIVE, attend_native)
AttentionMaskInterface.register(NAME, sdpa_mask)  # when transformers builds a mask itself (generate), as for SDPA
