"""One step of the loop thread, phase by phase: retire, prefill the groups the plan chose, keep the new rows'
blocks in the prefix cache, decode every row (reading the plan's prompt parts in the same forward, or verifying
a draft), keep finished rows' blocks. Each phase's samples become events (server/outputs.py); `flush` hands
them to their event loops after each prefill group, so first tokens do not wait for the rest of the step.
A failure in one phase fails the requests it concerned; the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.types import Part, PartsFailed, Sampled
from server import metrics
from server.outputs import Outputs
from server.request import FinishReason, Request
from server.row import Row, owners, rows_of
from server.scheduler import Plan, Scheduler

if TYPE_CHECKING:
    from models import ModelRunner
    from models.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


@dataclass
class Steps:
    runner: ModelRunner[Row]
    scheduler: Scheduler
    outputs: Outputs
    prefix_cache: PrefixCache | None
    lock: threading.Lock  # guards the scheduler's queue
    flush: Callable[[], None]  # hand the events so far to their event loops

    def fail_all(self, message: str) -> None:
        """A bug outside any one request: every row in the batch (and staged) ends with an error."""
        rows = [*self.runner.rows, *self.runner.staged]
        self.outputs.fail(owners(rows), message)
        self.runner.drop(rows)

    def step(self, plan: Plan) -> None:
        """Run the plan's phases."""
        for request in plan.aborted:
            self.outputs.finish(request, FinishReason.ABORT)
        self._retire(plan.leaving)
        joined = []
        for group in plan.groups:
            joined += self._prefill(group)
            self.flush()  # a group's first tokens leave now, not after the next group or the decode step
        if joined:
            self._save(joined)
            with self.lock:
                leaving = self.scheduler.retire()
            self._retire(leaving)
        if self.runner.rows or plan.parts:
            rows = list(self.runner.rows)
            read = self._decode(plan.draft, plan.parts)
            # A finished request's prompt and answer stay cached for its next turn.
            done = [r for r in owners(rows) if r.finished and r.finish_reason is not FinishReason.ERROR]
            self._save(read + done)

    def _accept(self, rows: Sequence[Row], samples: Sequence[Sampled]) -> None:
        """Turn samples into events, then apply the beam searches' moves to the batch."""
        for move in self.outputs.accept(rows, samples):
            try:
                self.runner.adopt(move.rows, move.parents)
            except Exception:
                log.exception("beam step failed", extra={"request_id": move.request.id})
                self.outputs.fail([move.request], "internal error while producing text")

    def _save(self, requests: list[Request]) -> None:
        """Keep the KV blocks of these requests' rows (still in the batch) in the prefix cache; a beam
        search's are not kept."""
        cache = self.prefix_cache
        requests = [r for r in requests if r.search is None]
        if cache is None or not requests:
            return
        evictions = cache.evictions
        try:
            self.runner.save(rows_of(requests))
        except Exception:  # the cache is an optimisation: a failure here must not fail the requests
            log.exception("saving to the prefix cache failed")
        metrics.PREFIX_CACHE_EVICTIONS.inc(cache.evictions - evictions)
        metrics.PREFIX_CACHE_BYTES.set(cache.bytes_used)

    def _retire(self, leaving: list[Request]) -> None:
        """Drop finished and cancelled rows from the batch; a cancelled one ends here."""
        if not leaving:
            return
        self.runner.drop(rows_of(leaving))
        for request in leaving:
            if not request.finished:
                self.outputs.finish(request, FinishReason.ABORT)

    def _prefill(self, joining: list[Request]) -> list[Request]:
        """Prefill one group; returns the rows that joined the batch."""
        started = time.monotonic()
        for request in joining:
            self._started(request, started)
        rows = [r.rows[0] for r in joining]  # a beam request is prefilled once, as slot 0
        try:
            samples = self.runner.prefill(rows, [r.cached_tokens for r in joining])
        except Exception:
            self._prefill_failed(joining)
            return []
        metrics.STEP_TIME.labels("prefill").observe(time.monotonic() - started)
        metrics.PREFILL_TOKENS.inc(sum(len(r.prompt_ids) - r.cached_tokens for r in joining))
        self._accept(rows, samples)
        return joining

    def _prefill_failed(self, requests: list[Request]) -> None:
        """Inside an `except`: log the failure with its traceback and end these requests with an error."""
        log.exception("prefill failed", extra={"request_ids": [r.id for r in requests]})
        self.outputs.fail(requests, "the model failed while reading the prompt")

    def _reused(self, request: Request, now: float) -> int:
        """Prompt tokens a chunked request reads from the prefix cache: all at its first chunk, which starts it."""
        if request.scheduled_at is not None:
            return 0
        self._started(request, now)
        return request.cached_tokens

    def _started(self, request: Request, now: float) -> None:
        request.scheduled_at = now
        metrics.QUEUE_TIME.observe(now - request.arrived_at)
        metrics.PROMPT_TOKENS.inc(len(request.prompt_ids))
        if request.cached_tokens:
            metrics.PREFIX_CACHE_HITS.inc()
            metrics.PREFIX_CACHED_TOKENS.inc(request.cached_tokens)

    def _decode(self, draft: list[int], parts: list[tuple[Request, int]]) -> list[Request]:
        """One decode step for every row; or, with a draft (for a lone greedy row), its verification, which
        may give that row several tokens; or, with prompts to read (`parts`), the step and those prompts in
        one forward. Returns the requests whose prompts were read to their end (they then run). A decode step
        that fails fails every row in it; prompts that fail it are read again each alone (`_read_alone`)."""
        started = time.monotonic()
        rows = list(self.runner.rows)
        reads = [Part(r.rows[0], tokens, self._reused(r, started), r.max_tokens > 1) for r, tokens in parts]
        try:
            carried = self._decode_with(reads) if reads else None
            if carried is not None:
                samples, firsts = carried
            else:
                samples = (self.runner.verify(draft) if draft else self.runner.decode()) if rows else []
                firsts = [self._read_alone(part) for part in reads]
        except Exception:
            failing = owners(rows) + [r for r, _ in parts if not r.finished]  # their parts were in the failed step
            log.exception("decode step failed", extra={"request_ids": [r.id for r in failing]})
            self.outputs.fail(failing, "the model failed during a decode step")
            self.runner.drop([*rows, *(r.rows[0] for r, _ in parts)])
            return []
        metrics.STEP_TIME.labels("decode" if rows else "prefill").observe(time.monotonic() - started)
        if rows:
            width = max(r.num_tokens for r in rows)
            metrics.PADDING_RATIO.set(1 - sum(r.num_tokens for r in rows) / (len(rows) * width))
        if not draft:
            read = [r for (r, _), first in zip(parts, firsts, strict=True) if first is not None]
            self._accept([*rows, *(r.rows[0] for r in read)], [*samples, *(f for f in firsts if f is not None)])
            return read
        metrics.SPECULATIVE_TOKENS.labels("drafted").inc(len(draft))
        metrics.SPECULATIVE_TOKENS.labels("accepted").inc(len(samples) - 1)
        for sampled in samples:  # in order; tokens after one that ends the request are dropped
            self._accept(rows, [sampled])
        return []

    def _decode_with(self, parts: list[Part[Row]]) -> tuple[list[Sampled], list[Sampled | None]] | None:
        """The decode step reading `parts`; None if that failed, with every row as it was: which part broke the
        forward is not known, so the running rows are then decoded alone and each part read alone."""
        try:
            carried = self.runner.decode_with(parts)
        except PartsFailed:
            return None
        metrics.PREFILL_TOKENS.inc(sum(part.tokens for part in parts))
        return carried

    def _read_alone(self, part: Part[Row]) -> Sampled | None:
        """Read `part` without the running rows: its row's first token if its prompt is now read, else None; if
        it fails, its request fails."""
        try:
            _, (first,) = self.runner.decode_with([part], decode=False)
        except PartsFailed:
            self._prefill_failed([part.row.request])
            return None
        metrics.PREFILL_TOKENS.inc(part.tokens)
        return first
