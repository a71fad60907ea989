"""What every generation route shares: submitting choices, merging their event streams, waiting with an eye
on the client, and counting outcomes (server/api/streaming.py sends them as they come).

Cancellation is abort: whatever way a response ends (done, client gone, error), every engine request it
submitted is cancelled on the way out; cancelling a finished request is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from models.types import TokenLogprobs
from server import metrics
from server.api.errors import ModelNotFound
from server.engine import Engine
from server.errors import ContextLengthExceeded, EngineUnavailable, GenerationFailed, InvalidRequest, QueueFull, TokenferryError
from server.request import Event, FinishReason, Hypothesis, SamplingParams, Scored, Usage

T = TypeVar("T")

ABORTED = "the request was aborted because the server is shutting down"


GENERATION_ERRORS = (InvalidRequest, ContextLengthExceeded, ModelNotFound, QueueFull, EngineUnavailable, GenerationFailed)


def renamed(exc: InvalidRequest, names: dict[str, str]) -> InvalidRequest:
    """The engine names its own parameters; the client knows them by their API names."""
    if exc.param in names:
        exc.message = exc.message.replace(exc.param, names[exc.param], 1)
        exc.param = names[exc.param]
    return exc


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


@dataclass
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[Scored] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: Usage | None = None
    beams: tuple[Hypothesis, ...] = ()  # a beam search's returned sequences, best first
    stop_string: str | None = None  # the stop string that ended it, if one did

    @property
    def cumulative_logprob(self) -> float:
        """The sum of the raw log-probabilities of every generated token: how best_of ranks candidates."""
        return sum(s.logprobs.logprob for s in self.logprobs)


class Choices:
    """The engine requests behind one API request: one per prompt and candidate, indexed prompt-major."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.ids: list[str] = []
        self._streams: list[AsyncIterator[Event]] = []
        self.prompt_tokens = 0
        self.candidates = 1  # engine requests per prompt

    def submit(
        self, prompts: Sequence[list[int]], params: SamplingParams, candidates: int, names: dict[str, str]
    ) -> None:
        """Queue every candidate, or none: if one is refused, those already queued are cancelled."""
        self.candidates = candidates
        try:
            for prompt in prompts:
                for i in range(candidates):
                    # Several choices of one seeded request must differ, and each stays reproducible.
                    choice = replace(params, seed=params.seed + i) if params.seed is not None and i else params
                    request_id = f"{self.request_id}-{len(self.ids)}"
                    self._streams.append(self.engine.submit(prompt, choice, request_id=request_id))
                    self.ids.append(request_id)
                self.prompt_tokens += len(prompt)
        except TokenferryError as exc:
            self.cancel()
            raise renamed(exc, names) if isinstance(exc, InvalidRequest) else exc

    def cancel(self) -> None:
        for request_id in self.ids:
            self.engine.cancel(request_id)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every choice's events as they come, tagged with the choice's index; ends when all are final."""
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[Event]) -> None:
            async for event in stream:
                queue.put_nowait((index, event))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        remaining = len(pumps)
        try:
            while remaining:
                index, event = await queue.get()
                yield index, event
                remaining -= event.final
        finally:
            for task in pumps:
                task.cancel()
            self.cancel()

    def best(self, results: Sequence[ChoiceResult], n: int) -> list[ChoiceResult]:
        """The n candidates of each prompt with the highest cumulative logprob, best first (best_of); a beam
        search's own n sequences, in its order."""
        if any(r.beams for r in results):
            return [_beam_choice(r, beam) for r in results for beam in r.beams]
        if n == self.candidates:
            return list(results)
        chosen: list[ChoiceResult] = []
        for start in range(0, len(results), self.candidates):
            group = results[start : start + self.candidates]
            chosen += sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
        return chosen

    def usage(self, results: Sequence[ChoiceResult]) -> dict[str, Any]:
        """Every candidate's tokens count, the ones best_of did not return included: they were generated.

        Prompt tokens count once per prompt, and so do the cached ones (those of each prompt's first candidate).
        """
        completion = sum(r.usage.completion_tokens for r in results if r.usage)
        cached = sum(r.usage.cached_tokens for r in results[:: self.candidates] if r.usage)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def outcome(results: Sequence[ChoiceResult]) -> str:
    reasons = {r.finish_reason for r in results}
    for reason, label in ((FinishReason.ERROR, "error"), (FinishReason.ABORT, "cancelled"), (FinishReason.LENGTH, "length")):
        if reason in reasons:
            return label
    return "stop"


def failure(result: ChoiceResult) -> TokenferryError | None:
    """What to tell the client about a choice that did not end normally."""
    if result.finish_reason is FinishReason.ERROR:
        return GenerationFailed(result.error or "generation failed")
    if result.finish_reason is FinishReason.ABORT:
        return EngineUnavailable(ABORTED)
    return None


async def collect(choices: Choices, request: Request, route: str) -> list[ChoiceResult]:
    """Wait for every choice to finish; a client that hangs up cancels them all."""
    results = [ChoiceResult() for _ in choices.ids]

    async def gather() -> None:
        async with contextlib.aclosing(choices.events()) as events:
            async for index, event in events:
                record(results[index], event)

    try:
        await until_disconnect(request, gather())
    except ClientGone:
        metrics.REQUESTS.labels(route, "cancelled").inc()
        raise
    for result in results:
        if error := failure(result):
            raise error  # counted where it becomes an HTTP answer, like every other error
    metrics.REQUESTS.labels(route, outcome(results)).inc()
    return results


async def whole(
    choices: Choices, request: Request, route: str, build: Callable[[list[ChoiceResult]], dict[str, Any]]
) -> Response:
    """The whole answer, `build` from every choice's result once all are done; 499 if the client left first."""
    try:
        results = await collect(choices, request, route)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(build(results))


def _beam_choice(search: ChoiceResult, beam: Hypothesis) -> ChoiceResult:
    return ChoiceResult(
        text=[beam.text],
        logprobs=list(beam.logprobs),
        prompt_logprobs=search.prompt_logprobs,
        finish_reason=beam.finish_reason,
        usage=Usage(search.usage.prompt_tokens if search.usage else 0, len(beam.token_ids)),
    )


def record(result: ChoiceResult, event: Event) -> None:
    result.text.append(event.text)
    result.logprobs += event.logprobs
    if event.prompt_logprobs is not None:
        result.prompt_logprobs = event.prompt_logprobs
    if event.final:
        result.finish_reason, result.error, result.usage = event.finish_reason, event.error, event.usage
        result.beams, result.stop_string = event.beams or (), event.stop_string


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, but cancel it and raise ClientGone if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


def created() -> int:
    return int(time.time())

