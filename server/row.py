"""A row of the running batch: the only key the model runner knows (models/types.py `Row`).

A request owns its rows: one (its sequence), or, for a beam search, K (one per running beam, slots 0..K-1,
best first). The request decides when it ends; a row is a sequence the model extends by one token a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.types import TokenLogprobs

if TYPE_CHECKING:
    from server.beam import BeamSearch
    from server.request import Request, SamplingParams


@dataclass(eq=False)
class Row:
    """One sequence in the batch (identity is the object). A request's own row shares the request's
    output list; a beam's output is its own, rewritten as the search reorders its beams."""

    request: Request
    output_ids: list[int]
    search: BeamSearch | None = None  # the beam search this row is a beam of
    slot: int = 0  # its rank in the search; candidates name their parent by it
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # a beam's tokens' raw scores
    score: float = 0.0  # a beam's sum of its tokens' log-probabilities, a float32 value

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def max_tokens(self) -> int:
        return self.request.max_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens: the row's length once its last sampled token is fed."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def beam(self) -> Row | None:
        """The row's place in a beam search (models' `Beam`: group, slot, score, keep); None for a request's own row."""
        return self if self.search is not None else None

    @property
    def group(self) -> BeamSearch | None:
        return self.search

    @property
    def keep(self) -> int:
        """Candidates the row's search wants per step."""
        assert self.search is not None
        return self.search.keep

    def suppressed_token_ids(self) -> frozenset[int]:
        """Before min_tokens, no stop token may be sampled (as in vLLM; for beams, transformers'
        MinNewTokensLengthLogitsProcessor), unless the grammar allows nothing else: then the row must end,
        and suppressing would leave no token at all."""
        request = self.request
        if len(self.output_ids) >= request.params.min_tokens:
            return frozenset()
        if request.grammar is not None and request.grammar.allows_only(request.stop_token_ids):
            return frozenset()
        return request.stop_token_ids

    def allowed_tokens(self) -> Any:
        """The grammar's bitmask of the tokens allowed now; None for free text (and for beams, which the
        API never constrains)."""
        grammar = self.request.grammar
        return None if grammar is None else grammar.allowed_tokens()


def owners(rows: Sequence[Row]) -> list[Request]:
    """The requests behind some rows, each once, in row order."""
    return list(dict.fromkeys(row.request for row in rows))


def rows_of(requests: Sequence[Request]) -> list[Row]:
    """The rows some requests hold."""
    return [row for request in requests for row in request.rows]
