"""Beam search as plain numbers: the running beams, the finished hypotheses and transformers' rules for both.

A beam request holds K rows of the running batch, one per running beam (server/row.py, slots 0..K-1,
best first). Each step the sampler hands the search its best continuations over all K rows (top `keep` =
max(2, 1 + stop tokens) * K by score, as transformers keeps); `BeamSearch.step` then does what
transformers' `_beam_search` does with them, in the same order and with the same float32 arithmetic:
  - a continuation ending in a stop token or a stop string, or reaching max_tokens, is finished;
  - the K best unfinished continuations become the running beams (their parents' KV rows are copied
    into the slots by the engine: `step` returns each slot's parent);
  - finished continuations among the top K may enter the K best finished hypotheses, scored by
    sum of logprobs / generated_length ** length_penalty (a final stop token counted);
  - the search ends when no running beam can improve on the worst finished hypothesis (transformers'
    heuristic, which `early_stopping` selects), when K hypotheses are finished and early_stopping is
    True, or when every continuation finished.
The prefill row is slot 0; the first step forks it K ways (every slot's parent is slot 0 then).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from models.types import Candidate, TokenLogprobs
from server.detokenizer import Detokenizer
from server.request import FinishReason, Hypothesis, Request, Scored
from server.row import Row

# transformers marks what may not be chosen by adding this to a float32 score.
EXCLUDED = -1.0e9


def f32(value: float) -> float:
    """`value` rounded to float32, as transformers' tensors hold every score."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass
class _Finished:
    """A slot of the finished list: transformers keeps K, placeholders included, sorted by score."""

    score: float
    done: bool = False  # a real hypothesis (False: a placeholder or an excluded continuation)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    reason: FinishReason = FinishReason.LENGTH


class BeamSearch:
    """The beams and hypotheses of one beam request; `step` takes a step's candidates, plain numbers only."""

    def __init__(self, request: Request, ends_text: Callable[[list[int]], bool] | None = None) -> None:
        """`ends_text(token_ids)`: whether these output tokens' text contains a stop string (None: no stop strings)."""
        params = request.params
        self.request = request
        self.width = params.beam_width or 1
        self.keep = max(2, 1 + len(request.stop_token_ids)) * self.width
        self.rows = [Row(request, [], self, slot) for slot in range(self.width)]
        self.finished = [_Finished(EXCLUDED) for _ in range(self.width)]
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied; once False, stays False
        self.prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
        self._ends_text = ends_text

    def step(self, candidates: Sequence[Candidate]) -> list[int] | None:
        """Take one step's candidates (best first); return each slot's parent slot, or None when the search is done."""
        width, params = self.width, self.request.params
        generated = len(self.rows[0].output_ids) + 1  # every beam's length after this step
        tokens = [self.rows[c.parent].output_ids + [c.logprobs.token_id] for c in candidates]
        reasons = [self._reason(ids) for ids in tokens]

        # The running beams: the best continuations that did not finish (finished ones sink by EXCLUDED).
        running = [f32(c.score + EXCLUDED) if r is not None else c.score for c, r in zip(candidates, reasons)]
        chosen = sorted(range(len(candidates)), key=lambda i: -running[i])[:width]

        # Finished continuations among the best K may become hypotheses.
        penalty = f32(generated**params.length_penalty)
        full = all(f.done for f in self.finished) and params.early_stopping is True
        entries = []
        for i, (c, reason) in enumerate(zip(candidates, reasons)):
            eligible = reason is not None and i < width
            value = f32(c.score / penalty)
            for excluded in (full, not self.improvable, not eligible):
                if excluded:
                    value = f32(value + EXCLUDED)
            parent = self.rows[c.parent]
            entries.append(
                _Finished(value, eligible, tokens[i], parent.logprobs + [c.logprobs], reason or FinishReason.LENGTH)
            )
        merged = self.finished + entries
        self.finished = [merged[i] for i in sorted(range(len(merged)), key=lambda i: -merged[i].score)[:width]]

        # The running slots take their continuations (read every parent before any slot changes).
        updates = [(candidates[i].parent, tokens[i], candidates[i].logprobs, running[i]) for i in chosen]
        parents = [parent for parent, *_ in updates]
        old = [(row.logprobs, row.score) for row in self.rows]
        for row, (parent, ids, logprobs, score) in zip(self.rows, updates):
            row.output_ids, row.logprobs, row.score = ids, old[parent][0] + [logprobs], score

        # Could a running beam still beat the worst hypothesis? (transformers' early-stop heuristic)
        if params.early_stopping == "never" and params.length_penalty > 0:
            best_length = self.request.max_tokens
        else:
            best_length = generated
        best_running = f32(self.rows[0].score / f32(best_length**params.length_penalty))
        worst = min(f.score for f in self.finished)
        self.improvable = self.improvable and any(best_running > (worst if f.done else EXCLUDED) for f in self.finished)

        all_done = all(f.done for f in self.finished)
        open_beam = not (all_done and params.early_stopping is True)
        continuing = not all(r is not None for r in reasons)
        return parents if self.improvable and open_beam and continuing else None

    def _reason(self, token_ids: list[int]) -> FinishReason | None:
        if token_ids[-1] in self.request.stop_token_ids:
            return FinishReason.STOP
        if self._ends_text is not None and self._ends_text(token_ids):
            return FinishReason.STOP
        if len(token_ids) >= self.request.max_tokens:
            return FinishReason.LENGTH
        return None

    def best(self) -> list[_Finished]:
        """The returned hypotheses: the best `beam_returns` finished ones, best first."""
        return [f for f in self.finished if f.done][: self.request.params.beam_returns]


def render(finished: _Finished, detokenizer: Detokenizer, stop_token_ids: frozenset[int], scores: bool) -> Hypothesis:
    """A finished hypothesis as returned: its text (a stop token's text not shown, a stop string cut), its scores."""
    pieces: list[str] = []
    scored: list[Scored] = []
    for token, logprobs in zip(finished.token_ids, finished.logprobs):
        offset = detokenizer.decoded_chars
        if token not in stop_token_ids and not detokenizer.stopped:
            pieces.append(detokenizer.push(token))
        if scores:
            scored.append(Scored(logprobs, text_offset=offset))
    pieces.append(detokenizer.flush())
    text = "".join(pieces)
    end = len(text)
    return Hypothesis(
        text=text,
        token_ids=tuple(finished.token_ids),
        logprobs=tuple(Scored(s.logprobs, min(s.text_offset, end)) for s in scored),
        score=finished.score,
        finish_reason=finished.reason,
    )
