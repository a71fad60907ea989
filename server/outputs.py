"""From a step's samples to each request's events: text, scores, stops, beam steps and the request's end.

Runs on the engine's loop thread. `accept` gives each row its new token (detokenized, checked against
stop tokens, stop strings, the grammar and max_tokens) and returns what the beam searches decided, for
the loop to apply to the batch; a request ends in `finish`, with one final event carrying its last text
and scores, the finish reason and the usage. Events wait in an outbox until `flush` hands them to their
event loops: one `call_soon_threadsafe` per loop, not one per token. Outputs touch no batch and no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from models.types import Sampled, TokenLogprobs
from server import metrics
from server.beam import BeamSearch, render
from server.detokenizer import Decoder, Detokenizer
from server.request import Event, FinishReason, Hypothesis, Request, Scored, Status
from server.row import Row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeamMove:
    """One step of a beam search, for the loop to apply to the batch: `rows[i]` continues from the cache
    of `parents[i]` (rows not yet in the batch join it)."""

    request: Request
    rows: list[Row]
    parents: list[Row]


class Outputs:
    """The loop thread's side of every request's event stream."""

    def __init__(self, tokenizer: Decoder) -> None:
        """`tokenizer`: the loop thread's own."""
        self._tokenizer = tokenizer
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = defaultdict(list)
        self._ended: list[Request] = []

    def accept(self, rows: Sequence[Row], samples: Sequence[Sampled]) -> list[BeamMove]:
        """Give each row its new token: detokenize, check for the end, queue the event. Returns the moves of
        the beam searches that go on, which the caller applies before the next step."""
        now = time.monotonic()
        moves = []
        for row, sampled in zip(rows, samples, strict=True):
            request = row.request
            if request.finished:  # failed or finished earlier in this step (a search's other rows included)
                continue
            try:
                if request.max_tokens == 0:  # only the prompt's scores were asked for: no token is kept
                    self.finish(request, FinishReason.LENGTH, prompt_logprobs=sampled.prompt_logprobs)
                elif request.search is not None:
                    if row.slot == 0:  # every row of a search carries the same candidates: one step per search
                        moves += self._beam_step(request, request.search, sampled, now)
                else:
                    self._advance(request, sampled, now)
            except Exception:
                log.exception("request failed", extra={"request_id": request.id})
                self.fail([request], "internal error while producing text")
        return moves

    def _advance(self, request: Request, sampled: Sampled, now: float) -> None:
        token = sampled.token
        metrics.GENERATED_TOKENS.inc()
        prompt_logprobs = sampled.prompt_logprobs  # set on the first token only
        stream = request.stream
        if stream.first_token_at is None:
            stream.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - request.arrived_at)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - stream.last_token_at)
        stream.last_token_at = now
        request.output_ids.append(token)
        detokenizer = stream.detokenizer
        if sampled.logprobs is not None:
            stream.unsent_logprobs.append(Scored(sampled.logprobs, text_offset=detokenizer.decoded_chars))
        reason = None
        complete = self._advance_grammar(request, token)
        if token in request.stop_token_ids or (complete and token in request.grammar.end_tokens):
            text, reason = "", FinishReason.STOP  # a stop token's own text is never shown
        else:
            text = detokenizer.push(token)
            if detokenizer.stopped or complete:
                reason = FinishReason.STOP
        if reason is None and len(request.output_ids) >= request.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            logprobs = () if detokenizer.holding else _take_logprobs(request)
            self._emit(request, Event(text=text, token_ids=(token,), logprobs=logprobs, prompt_logprobs=prompt_logprobs))
        else:
            text += detokenizer.flush()
            self.finish(
                request, reason, text=text, token_ids=(token,), prompt_logprobs=prompt_logprobs, stop_string=detokenizer.matched
            )

    def _advance_grammar(self, request: Request, token: int) -> bool:
        """Walk a constrained request's grammar by its new token; True once the grammar is complete, which
        ends the request ("stop"). A token the grammar refuses raises, failing this request alone."""
        return request.grammar is not None and request.grammar.accept(token)

    def _beam_step(self, request: Request, search: BeamSearch, sampled: Sampled, now: float) -> list[BeamMove]:
        """Advance a beam search by one step: its move (rows take their parents' caches), or its end with its
        best sequences (no move)."""
        # Tokens the step computed for the search: one row's at its prefill, then each of its K rows'.
        stream = request.stream
        metrics.GENERATED_TOKENS.inc(len(search.rows) if stream.first_token_at is not None else 1)
        if stream.first_token_at is None:
            stream.first_token_at = now
            search.prompt_logprobs = sampled.prompt_logprobs
        stream.last_token_at = now
        parents = search.step(sampled.candidates or ())
        if parents is not None:
            return [BeamMove(request, list(search.rows), [search.rows[p] for p in parents])]
        scores = request.params.logprobs is not None
        beams = tuple(
            render(f, Detokenizer(self._tokenizer, request.params.stop), request.stop_token_ids, scores)
            for f in search.best()
        )
        self.finish(request, beams[0].finish_reason, prompt_logprobs=search.prompt_logprobs, beams=beams)
        return []

    def finish(
        self,
        request: Request,
        reason: FinishReason,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        error: str | None = None,
        prompt_logprobs: tuple[TokenLogprobs, ...] | None = None,
        beams: tuple[Hypothesis, ...] | None = None,
        stop_string: str | None = None,
    ) -> None:
        """End a request with one final event carrying its last text and scores, the reason and the usage
        (a beam search's: its returned sequences and their tokens)."""
        request.status = Status.FINISHED
        request.finish_reason = reason
        self._ended.append(request)
        if request.stream.first_token_at is not None:
            metrics.E2E_LATENCY.observe(time.monotonic() - request.arrived_at)
        usage = request.usage()
        if beams is not None:
            usage = replace(usage, completion_tokens=sum(len(b.token_ids) for b in beams))
        event = Event(
            text=text,
            token_ids=token_ids,
            logprobs=_take_logprobs(request),
            prompt_logprobs=prompt_logprobs,
            finish_reason=reason,
            usage=usage,
            error=error,
            beams=beams,
            stop_string=stop_string,
        )
        self._emit(request, event)
        log.debug(
            "finished",
            extra={"request_id": request.id, "reason": str(reason), "completion_tokens": len(request.output_ids)},
        )

    def fail(self, requests: Sequence[Request], message: str) -> None:
        for request in requests:
            if not request.finished:
                self.finish(request, FinishReason.ERROR, error=message)

    def _emit(self, request: Request, event: Event) -> None:
        self._outbox[request.stream.loop].append((request, event))

    def take_ended(self) -> list[Request]:
        """The requests that ended since the last call: the engine stops tracking them."""
        ended, self._ended = self._ended, []
        return ended

    def flush(self) -> list[Request]:
        """Hand the events so far to their event loops; returns the requests whose loop has closed (nobody
        listens any more: the caller cancels them)."""
        outbox, self._outbox = self._outbox, defaultdict(list)
        orphans = []
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed
                orphans += [request for request, _ in items]
        return orphans


def _take_logprobs(request: Request) -> tuple[Scored, ...]:
    """The scores waiting for their text to go out, now that it has.

    NOTE: a token whose text a stop string cut off starts past the end of the released text: its offset
    is clamped there, so every offset stays within the text the client receives.
    """
    stream = request.stream
    end = stream.detokenizer.released_chars
    scored = tuple(replace(s, text_offset=min(s.text_offset, end)) for s in stream.unsent_logprobs)
    stream.unsent_logprobs.clear()
    return scored


def _deliver(items: list[tuple[Request, Event]]) -> None:
    for request, event in items:
        request.stream.events.put_nowait(event)
