"""The generation engine: one thread owns the model; asyncio code submits, streams and cancels.

Public face: `submit` (admit and queue; returns the request's event stream), `cancel`, `shutdown`, plus
read-only health facts. Admission (server/admission.py) refuses a bad request before anything is queued.
The loop thread asks the scheduler for a plan each step and runs it (server/steps.py):
  1. retire finished and cancelled rows            (scheduler.schedule, runner.drop)
  2. prefill the newcomers the scheduler chose to group (left-padded groups of similar length, written into
     the batch; prompt tokens the prefix cache holds are copied, not computed): when nothing decodes, or for
     what cannot ride in a decode step
  3. keep the new rows' prompt blocks in the prefix cache; retire rows that finished on their first token
  4. one decode step for every row (one token per row, KV reused), reading in the same forward the prompts
     of the newcomers that ride in it and the next chunk of a long prompt read in chunks (they run alone
     when no row decodes); a prompt read to its end decodes from the next step on, and one that its first
     token ended never enters the batch
  5. keep the blocks of rows that finished in the prefix cache
Blocks enter the prefix cache (and may evict others) only after the step's prefills, so a hit the scheduler
planned is still cached when its group reads it. A failure in one request ends that request with an error
event; the loop and the others go on.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import models
from server import metrics
from server.admission import ModelFacts, admit
from server.errors import EngineUnavailable, InvalidRequest
from server.outputs import Outputs
from server.request import Event, Request, SamplingParams
from server.scheduler import Budgets, Scheduler
from server.steps import Steps
from server.grammars import GrammarCompiler

if TYPE_CHECKING:
    from models import LoadedModel

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
        # `models` loads torch on first use of its names: here, not when the server's modules are imported.
        self.prefix_cache = cache = models.prefix_cache_for(loaded.model, loaded.info.name, loaded.info.dtype, prefix_cache_bytes)
        metrics.PREFIX_CACHE_CAPACITY.set(cache.capacity * cache.block_bytes if cache is not None else 0)
        self._runner = models.ModelRunner(loaded.model, budgets.max_batch_size, cache)
        self._scheduler = Scheduler(budgets, cache)
        self._facts = ModelFacts(self.info, self._tokenizer, budgets.max_batch_size, cache)
        self._lock = threading.Lock()  # guards the scheduler's queue, _requests and _accepting
        self._wake = threading.Event()
        self._requests: dict[str, Request] = {}
        self._accepting = True
        self._stopping = False
        self._stopped = False  # the loop has ended, normally or not
        self._outputs = Outputs(self._tokenizer)
        self._steps = Steps(self._runner, self._scheduler, self._outputs, cache, self._lock, self._flush)
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
        request = admit(self._facts, list(prompt_ids), params, request_id or uuid.uuid4().hex, loop)
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
    def batch_tokens(self) -> int:
        """Rows x padded length of the running batch (the KV it holds, as admission counts it)."""
        return self._scheduler.batch_tokens

    @property
    def num_requests(self) -> int:
        """Requests the engine still tracks: waiting, running, or finished but not yet retired."""
        return len(self._requests)

    async def _stream(self, request: Request) -> AsyncIterator[Event]:
        try:
            while True:
                event = await request.stream.events.get()
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
                metrics.KV_USAGE.set(self._scheduler.kv_usage)
            try:
                self._steps.step(plan)
            except Exception:  # a bug outside any one request: fail everyone, keep serving
                log.exception("engine step failed; failing all running requests")
                self._steps.fail_all("internal error in the engine loop")
            self.steps += 1
            self._flush()
            if busy:
                continue
            if self._stopping:
                return
            self._wake.wait(IDLE_WAKE_S)

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        metrics.RUNNING.set(len(self._runner.rows))  # before anyone hears a token, the gauge counts its row
        metrics.KV_STORE_BYTES.set(self._runner.store_bytes)
        ended = self._outputs.take_ended()
        if ended:  # before their final events leave: a client that has its answer finds its id free
            with self._lock:
                for request in ended:
                    self._requests.pop(request.id, None)
        for request in self._outputs.flush():  # its event loop has closed: nobody is listening any more
            self.cancel(request.id)

