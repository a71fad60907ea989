"""Grammar masks on the logits: the only grammar code that touches torch.

A constrained row hands the sampler an int32 bitmask over the vocabulary (token t is allowed when bit
t % 32 of word t // 32 is set, llguidance's layout); every other token's logit becomes -inf before
anything else reads the logits. The bits are unpacked here with plain tensor ops (llguidance's own
`apply_token_bitmask_inplace` is wrapped in torch.compile, which this CPU cannot lower). Free rows cost
nothing: they are not even looked at past `allowed_tokens()` returning None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)


class Constrained(Protocol):
    def allowed_tokens(self) -> Any:
        """An int32 bitmask (numpy array of ceil(vocab / 32) words) of the tokens allowed now, or None."""
        ...


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 words [rows, words] -> bool [rows, vocab]; tokens past the mask's end are not allowed."""
    shifts = _SHIFTS.to(bitmask.device)
    bits = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)  # [rows, 32 * words]
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)


def apply_masks(logits: torch.Tensor, rows: Sequence[Constrained]) -> None:
    """Set the logits of every token a constrained row may not produce to -inf, in place."""
    masks = [(i, mask) for i, row in enumerate(rows) if (mask := row.allowed_tokens()) is not None]
    if not masks:
        return
    device = logits.device
    index = torch.tensor([i for i, _ in masks], device=device)
    words = torch.from_numpy(np.stack([mask for _, mask in masks])).to(device)
    allowed = unpack(words, logits.shape[-1])
    if len(masks) == logits.shape[0]:  # every row constrained: no gather and scatter
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[index] = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
