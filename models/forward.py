"""The inputs of one model call over some rows, and several such calls merged into one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from models.attention import Span
from models.kv_cache import flat_cache


@dataclass
class Forward:
    """Inputs of one model call over some rows of the batch."""

    input_ids: torch.Tensor  # [rows, q]
    position_ids: torch.Tensor  # [rows, q]
    attention_mask: torch.Tensor  # [rows, 1, q, past + q] bool, True where a query may attend
    cache: Cache
    real_tokens: int  # input tokens that are not padding
    # A flattened forward (`flatten`) only: where each row's last token sits in its one sequence [rows], and
    # where each part's tokens sit.
    last: torch.Tensor | None = None
    spans: tuple[Span, ...] = ()


def flatten(forwards: Sequence[Forward]) -> Forward:
    """One forward over several (a decode step and a prompt's chunk, from different batches): their tokens in
    one sequence `[1, tokens]`, so every matrix product reads the weights once for all of them, while each
    part attends to its own cache with its own mask (models/attention.py). Its logits are each row's last
    token's, in the order of `forwards` and their rows: `[rows, 1, vocab]` once `ModelRunner._forward` is done."""
    spans, at = [], 0
    for forward in forwards:
        rows, q = forward.input_ids.shape
        spans.append(Span(at, rows, q, forward.attention_mask))
        at += rows * q
    last = [span.at + (row + 1) * span.q - 1 for span in spans for row in range(span.rows)]
    device = forwards[0].input_ids.device
    return Forward(
        input_ids=torch.cat([f.input_ids.reshape(-1) for f in forwards])[None],
        position_ids=torch.cat([f.position_ids.reshape(-1) for f in forwards])[None],
        # Each part brings its own mask; a 4-D one here only tells transformers not to build any.
        attention_mask=torch.ones((1, 1, 0, 0), dtype=torch.bool, device=device),
        cache=flat_cache([f.cache for f in forwards], spans),
        real_tokens=sum(f.real_tokens for f in forwards),
        last=torch.tensor(last, device=device),
        spans=tuple(spans),
    )
