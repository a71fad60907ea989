"""The generation engine: one thread owns the model; asyncio code submits, streams and cancels.

Public face: `submit` (validate and queue; returns the request's event stream), `cancel`, `shutdown`,
plus read-only health facts. Every step of the loop thread:
  1. retire finished and cancelled rows            (scheduler.schedule, runner.drop)
  2. prefill the newcomers the scheduler chose (left-padded groups of similar length, written into the
     batch; prompt tokens the prefix cache holds are copied, not computed)
  3. keep the new rows' prompt blocks in the prefix cache; retire rows that finished on their first token
  4. one decode step for every row (one token per row, KV reused), carrying the next chunk of a long prompt
     read in chunks, if any (it runs alone when no row does); a prompt read to its end decodes from the
     next step on, and one that its first token ended never enters the batch
  5. keep the blocks of rows that finished in the prefix cache
Each phase's samples become events in server/outputs.py, which hands them to their event loops after the
phase (first tokens leave right after each prefill group or chunk, so neither later groups nor a decode
step delay them).
Blocks enter the prefix cache (and may evict others) only after the step's prefills, so a hit the scheduler
planned is still cached when its group reads it.
A failure in one request ends that request with an error event; the loop and the others go on.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from models import LoadedModel, ModelRunner
from models.runner import ChunkFailed, Sampled
from models.kv_cache import CacheShape
from models.prefix_cache import PrefixCache, chain_root, default_bytes
from server import metrics
from server.beam import BeamSearch, owners, rows_of
from server.detokenizer import Detokenizer
from server.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest
from server.outputs import Outputs
from server.request import Event, FinishReason, Request, SamplingParams, Status
from server.scheduler import Budgets, Plan, Scheduler
from server.structured import GrammarCompiler

log = logging.getLogger(__name__)

# The loop wakes at least this often when idle, so the heartbeat shows it alive.
IDLE_WAKE_S = 1.0


class Engine:
    """Continuous batching over one model, driven by a dedicated thread."""

    def __init__(self, loaded: LoadedModel, budgets: Budgets, prefix_cache_bytes: int | None = None) -> None:
        """`prefix_cache_bytes`: the prefix cache's bound (None: a share of free memory; 0: no cache)."""
        self.info = loaded.info
        self.budgets = budgets
        # The event loop thread encodes prompts with `tokenizer`; the loop thread decodes with its own copy,
        # since a tokenizer's backend must not be used from two threads at once.
        self.tokenizer = loaded.tokenizer
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        # Structured output: grammars compile on their own worker threads, before their requests are queued.
        self.grammars = GrammarCompiler(loaded.tokenizer, self.info.vocab_size, self.info.eos_token_ids)
        self.prefix_cache = _prefix_cache(loaded, prefix_cache_bytes)
        cache = self.prefix_cache
        metrics.PREFIX_CACHE_CAPACITY.set(cache.capacity * cache.block_bytes if cache is not None else 0)
        self._runner: ModelRunner[Request] = ModelRunner(loaded.model, budgets.max_batch_size, self.prefix_cache)
        self._scheduler = Scheduler(budgets, self.prefix_cache)
        self._lock = threading.Lock()  # guards the scheduler's queue, _requests and _accepting
        self._wake = threading.Event()
        self._requests: dict[str, Request] = {}
        self._accepting = True
        self._stopping = False
        self._stopped = False  # the loop has ended, normally or not
        self._outputs = Outputs(self._tokenizer, self._runner.adopt, self._forget)
        self._thread = threading.Thread(target=self._loop, name="tokenferry-engine", daemon=True)
        self.heartbeat = time.monotonic()
        self.steps = 0

    # ---- public face (asyncio side) ----

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Event]:
        """Queue a request and return its events; the last one has a finish reason.

        Raises InvalidRequest (a bad prompt), ContextLengthExceeded, QueueFull or EngineUnavailable at
        once, before anything is queued. Closing or cancelling the iterator cancels the request.
        """
        loop = asyncio.get_running_loop()
        request = self._make_request(list(prompt_ids), params, request_id or uuid.uuid4().hex, loop)
        with self._lock:
            if not self.accepting:
                raise EngineUnavailable("the engine is not accepting requests (draining or stopped)")
            if request.id in self._requests:
                raise InvalidRequest(f"request id {request.id!r} is already in use", param="request_id")
            self._scheduler.add(request)
            self._requests[request.id] = request
            metrics.WAITING.set(len(self._scheduler.waiting))
        log.debug("queued", extra={"request_id": request.id, "prompt_tokens": len(request.prompt_ids)})
        self._wake.set()
        return self._stream(request)

    def cancel(self, request_id: str) -> None:
        """Abort a request; its row leaves the batch at the start of the next step."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or request.finished:
                return
            request.cancelled = True
        log.debug("cancel", extra={"request_id": request_id})
        self._wake.set()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with `drain`, finish everything queued and running (up to `timeout` seconds),
        then abort what is left and stop the loop thread."""
        with self._lock:
            self._accepting = False
            ids = list(self._requests)
        if not drain:
            for request_id in ids:
                self.cancel(request_id)
        self._stopping = True
        self._wake.set()
        self.grammars.close()
        if not self._thread.is_alive():
            return
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            with self._lock:
                ids = list(self._requests)
            log.warning("drain timed out; aborting requests", extra={"requests": len(ids)})
            for request_id in ids:
                self.cancel(request_id)
            await asyncio.to_thread(self._thread.join)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_requests(self) -> int:
        """Requests the engine still tracks: waiting, running, or finished but not yet retired."""
        return len(self._requests)

    # ---- submission helpers ----

    def _make_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, loop: asyncio.AbstractEventLoop
    ) -> Request:
        info = self.info
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < info.vocab_size for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {info.vocab_size})", param="prompt")
        if params.beam_width is not None and params.beam_width > self.budgets.max_batch_size:
            raise InvalidRequest(
                f"beam_width ({params.beam_width}) exceeds the batch size ({self.budgets.max_batch_size}): each beam is a row",
                param="beam_width",
            )
        if any(not 0 <= t < info.vocab_size for t in params.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {info.vocab_size})", param="stop_token_ids")
        room = info.context_length - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if room < 1 or max_tokens > room:
            raise ContextLengthExceeded(
                f"this model's context is {info.context_length} tokens; the prompt has {len(prompt_ids)} and "
                f"{max_tokens} more were asked for. Shorten the prompt or lower max_tokens.",
                param="max_tokens" if room >= 1 else "prompt",
            )
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(info.eos_token_ids)
        # The last prompt token is always computed (its logits give the first token), so it is never looked up.
        keys = self.prefix_cache.keys_of(prompt_ids[:-1]) if self.prefix_cache else []
        request = Request(
            id=request_id,
            prompt_ids=prompt_ids,
            block_keys=keys,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=frozenset(stop_ids),
            detokenizer=Detokenizer(self._tokenizer, params.stop),
            loop=loop,
            grammar=params.grammar.start() if params.grammar is not None else None,
        )
        if params.beam_width is not None:
            request.search = BeamSearch(request, self._stop_string_check(params.stop))
        return request

    def _stop_string_check(self, stop: tuple[str, ...]) -> Callable[[list[int]], bool] | None:
        """Whether some output tokens' text holds a stop string (beam search asks it of each continuation)."""
        if not stop:
            return None
        tokenizer = self._tokenizer  # only ever called on the loop thread
        return lambda ids: any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)

    async def _stream(self, request: Request) -> AsyncIterator[Event]:
        try:
            while True:
                event = await request.events.get()
                yield event
                if event.final:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel(request.id)
            raise

    # ---- the loop thread ----

    def _loop(self) -> None:
        log.info("engine loop started", extra={"model": self.info.name, "device": self.info.device})
        try:
            self._run()
        except BaseException:
            log.critical("the engine loop died", exc_info=True)
            raise
        finally:
            # Whatever ended the loop, nobody may wait forever: what is still tracked ends with an error.
            with self._lock:
                self._accepting = False
                self._stopped = True
                abandoned = list(self._requests.values())
            self._outputs.fail(abandoned, "the engine stopped")
            self._flush()
            log.info("engine loop stopped")

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            self._wake.clear()
            with self._lock:
                plan = self._scheduler.schedule()
                busy = self._scheduler.has_work
                metrics.WAITING.set(len(self._scheduler.waiting))
            try:
                self._step(plan)
            except Exception:  # a bug outside any one request: fail everyone, keep serving
                log.exception("engine step failed; failing all running requests")
                rows = [*self._runner.rows, *self._runner.staged]
                self._outputs.fail(owners(rows), "internal error in the engine loop")
                self._runner.drop(rows)
            self._flush()
            if busy:
                continue
            if self._stopping:
                return
            self._wake.wait(IDLE_WAKE_S)

    def _step(self, plan: Plan) -> None:
        for request in plan.aborted:
            self._outputs.finish(request, FinishReason.ABORT)
        self._retire(plan.leaving)
        joined = []
        for group in plan.groups:
            joined += self._prefill(group)
            self._flush()  # a group's first tokens leave now, not after the next group or the decode step
        chunk = plan.chunk
        if chunk is not None and not self._runner.rows:  # nothing to decode beside it: the chunk runs alone
            joined += self._chunk(*chunk)
            self._flush()
            chunk = None
        if joined:
            self._save(joined)
            with self._lock:
                leaving = self._scheduler.retire()
            self._retire(leaving)
        if self._runner.rows:
            rows = list(self._runner.rows)
            chunked = self._decode(plan.draft, chunk)
            # A finished request's prompt and answer stay cached for its next turn (beam rows are not kept).
            done = [r for r in rows if isinstance(r, Request) and r.finished and r.finish_reason is not FinishReason.ERROR]
            self._save(chunked + done)
        self.steps += 1

    def _save(self, rows: list[Request]) -> None:
        """Keep the KV blocks of these rows (still in the batch) in the prefix cache."""
        cache = self.prefix_cache
        if cache is None or not rows:
            return
        evictions = cache.evictions
        try:
            self._runner.save(rows)
        except Exception:  # the cache is an optimisation: a failure here must not fail the requests
            log.exception("saving to the prefix cache failed")
        metrics.PREFIX_CACHE_EVICTIONS.inc(cache.evictions - evictions)
        metrics.PREFIX_CACHE_BYTES.set(cache.bytes_used)

    def _retire(self, leaving: list[Request]) -> None:
        """Drop finished and cancelled rows from the batch; a cancelled one ends here."""
        if not leaving:
            return
        self._runner.drop(rows_of(leaving))
        for request in leaving:
            if not request.finished:
                self._outputs.finish(request, FinishReason.ABORT)

    def _prefill(self, joining: list[Request]) -> list[Request]:
        """Prefill one group; returns the rows that joined the batch."""
        started = time.monotonic()
        for request in joining:
            self._started(request, started)
        rows = [r.search.rows[0] if r.search else r for r in joining]  # a beam request is prefilled once, as slot 0
        try:
            samples = self._runner.prefill(rows, [r.cached_tokens for r in joining])
        except Exception:
            self._prefill_failed(joining)
            return []
        metrics.STEP_TIME.labels("prefill").observe(time.monotonic() - started)
        metrics.PREFILL_TOKENS.inc(sum(len(r.prompt_ids) - r.cached_tokens for r in joining))
        self._outputs.accept(rows, samples)
        return joining

    def _chunk(self, request: Request, tokens: int) -> list[Request]:
        """Prefill one chunk of a long prompt while no row runs (else it rides in `_decode`); returns the request
        once its last chunk has been read (it then runs)."""
        started = time.monotonic()
        try:
            sampled = self._runner.prefill_chunk(request, tokens, self._reused(request, started), request.max_tokens > 1)
        except Exception:
            self._prefill_failed([request])
            return []
        metrics.STEP_TIME.labels("prefill").observe(time.monotonic() - started)
        metrics.PREFILL_TOKENS.inc(tokens)
        if sampled is None:
            return []
        self._outputs.accept([request], [sampled])
        return [request]

    def _prefill_failed(self, requests: list[Request]) -> None:
        """Inside an `except`: log the failure with its traceback and end these requests with an error."""
        log.exception("prefill failed", extra={"request_ids": [r.id for r in requests]})
        self._outputs.fail(requests, "the model failed while reading the prompt")

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

    def _decode(self, draft: list[int], chunk: tuple[Request, int] | None = None) -> list[Request]:
        """One decode step for every row; or, with a draft (for a lone greedy row), its verification, which
        may give that row several tokens; or, with a prompt's chunk, the step and the chunk in one forward.
        Returns the chunked request if its last chunk was read (it then runs). A decode step that fails fails
        every row in it."""
        started = time.monotonic()
        rows = list(self._runner.rows)
        try:
            carried = self._decode_with_chunk(*chunk, started) if chunk is not None else None
            if carried is not None:
                samples, first = carried
            else:
                samples, first = self._runner.verify(draft) if draft else self._runner.decode(), None
        except Exception:
            failing = owners(rows)
            if chunk is not None and not chunk[0].finished:  # its chunk was in the failed step
                failing.append(chunk[0])
            log.exception("decode step failed", extra={"request_ids": [r.id for r in failing]})
            self._outputs.fail(failing, "the model failed during a decode step")
            self._runner.drop(rows)
            return []
        metrics.STEP_TIME.labels("decode").observe(time.monotonic() - started)
        width = max(r.num_tokens for r in rows)
        metrics.PADDING_RATIO.set(1 - sum(r.num_tokens for r in rows) / (len(rows) * width))
        if first is not None:
            request = chunk[0]
            self._outputs.accept([*rows, request], [*samples, first])
            return [request]
        if not draft:
            self._outputs.accept(rows, samples)
            return []
        metrics.SPECULATIVE_TOKENS.labels("drafted").inc(len(draft))
        metrics.SPECULATIVE_TOKENS.labels("accepted").inc(len(samples) - 1)
        for sampled in samples:  # in order; tokens after one that ends the request are dropped
            self._outputs.accept(rows, [sampled])
        return []

    def _decode_with_chunk(self, request: Request, tokens: int, now: float) -> tuple[list[Sampled], Sampled | None] | None:
        """The decode step carrying `request`'s next chunk; None if the chunk failed, which fails its request
        alone (the runner leaves the running rows as they were, to be decoded without it)."""
        try:
            carried = self._runner.decode_with_chunk(request, tokens, self._reused(request, now), request.max_tokens > 1)
        except ChunkFailed:
            self._prefill_failed([request])
            return None
        metrics.PREFILL_TOKENS.inc(tokens)
        return carried

    def _forget(self, request: Request, reason: FinishReason) -> None:
        """A request has ended (Outputs.finish): mark it, and stop tracking it."""
        with self._lock:
            request.status = Status.FINISHED
            request.finish_reason = reason
            self._requests.pop(request.id, None)

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        metrics.RUNNING.set(len(self._runner.rows))  # before anyone hears a token, the gauge counts its row
        for request in self._outputs.flush():  # its event loop has closed: nobody is listening any more
            self.cancel(request.id)


def _prefix_cache(loaded: LoadedModel, max_bytes: int | None) -> PrefixCache | None:
    shape = CacheShape.of(loaded.model)
    max_bytes = default_bytes(shape.device) if max_bytes is None else max_bytes
    cache = PrefixCache(shape, max_bytes, chain_root(loaded.info.name, loaded.info.dtype))
    return cache if cache.capacity else None
