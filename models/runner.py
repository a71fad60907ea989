"""The only caller of `model.forward`: prefill newcomers, decode every row, sample one token per row.

The engine thread drives it with its own request objects as row keys; `prefill` and `decode` each run
one forward under `torch.inference_mode` and return plain token ids after one device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Generic, TypeVar

import torch
from transformers import PreTrainedModel

from models.batch import Batch, Forward
from models.kv_cache import CacheShape
from models.sampler import Row, make_generator, sample

R = TypeVar("R", bound=Row)


class ModelRunner(Generic[R]):
    """Owns the model, the running batch and each row's random generator."""

    def __init__(self, model: PreTrainedModel, max_rows: int) -> None:
        self.model = model
        self.batch: Batch[R] = Batch(CacheShape.of(model), max_rows)
        self._generators: dict[R, torch.Generator] = {}

    @property
    def rows(self) -> list[R]:
        """The running rows in batch order."""
        return self.batch.keys

    def prefill(self, rows: Sequence[R]) -> list[int]:
        """Add `rows` to the batch, prefill their prompts as one group, return each one's first token.

        On failure the new rows are dropped again and the running ones are untouched.
        """
        forward = self.batch.prefill(rows, [row.prompt_ids for row in rows])
        for row in rows:
            self._generators[row] = make_generator(row.params.seed)
        try:
            return self._sample(self._forward(forward), rows)
        except BaseException:
            self.drop(rows)
            raise

    def decode(self) -> list[int]:
        """One step for every row: feed its last sampled token, return its next one."""
        rows = self.rows
        forward = self.batch.decode([row.output_ids[-1] for row in rows])
        return self._sample(self._forward(forward), rows)

    def drop(self, rows: Collection[R]) -> None:
        """Remove rows from the batch (finished, cancelled or failed)."""
        self.batch.filter(rows)
        for row in rows:
            self._generators.pop(row, None)

    @torch.inference_mode()
    def _forward(self, forward: Forward) -> torch.Tensor:
        output = self.model(
            input_ids=forward.input_ids,
            position_ids=forward.position_ids,
            attention_mask=forward.attention_mask,
            past_key_values=forward.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :]  # [rows, vocab]

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, rows: Sequence[R]) -> list[int]:
        tokens = sample(logits, rows, [self._generators[row] for row in rows])
        return tokens.tolist()  # the step's one device-to-host copy
