"""How answers stream out: Server-Sent Events, framed the way each API frames them (OpenAI's `data:` chunks and
`[DONE]`; Anthropic's and the Responses API's named events), by one loop over every choice's events; and how a
generation route documents its answers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from server import metrics
from server.api.errors import documented, status_and_body
from server.api.generation import GENERATION_ERRORS, ChoiceResult, Choices, failure, outcome, record
from server.errors import TokenferryError
from server.request import Event, FinishReason

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def named_sse(kind: str, payload: dict[str, Any]) -> str:
    """An `event: kind` frame whose JSON carries its kind as `type` (Anthropic's and the Responses API's)."""
    return f"event: {kind}\n{sse({'type': kind, **payload})}"


# Open API 3.1 reads an event stream's schema as that of each event.
DATA_EVENTS = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"}},
}
NAMED_EVENTS = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string", "description": "the event as JSON, its `type` the event's"}},
}


def generation_responses(
    body: type, description: str, events: dict[str, Any] = DATA_EVENTS, anthropic: bool = False
) -> dict[int | str, dict[str, Any]]:
    """A generation route's `responses=`: one JSON `body`, or with `stream: true` Server-Sent Events, and its errors."""
    return {
        200: {"model": body, "description": description, "content": {"text/event-stream": {"schema": events}}},
        **documented(*GENERATION_ERRORS, anthropic=anthropic),
    }


class ChunkFormat(Protocol):
    """How an OpenAI API shapes its stream chunks (chat and completions differ)."""

    def start(self, index: int) -> dict[str, Any] | None: ...

    def delta(self, index: int, event: Event) -> dict[str, Any] | None:
        """The chunk for an event's text and scores; None when there is nothing to send yet."""
        ...

    def finish(self, index: int, reason: str) -> dict[str, Any]: ...

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]: ...


class StreamFormat(Protocol):
    """How one API frames its event stream: each method returns the SSE frames to send, in order."""

    def opening(self, choices: int) -> list[str]: ...

    def delta(self, index: int, event: Event) -> list[str]: ...

    def finish(self, index: int, result: ChoiceResult) -> list[str]:
        """The frames that close one choice, which ended normally."""
        ...

    def closing(self, usage: dict[str, Any]) -> list[str]:
        """The last frames, once every choice has finished; `usage` as `Choices.usage` counts it."""
        ...

    def failed(self, error: TokenferryError) -> list[str]:
        """The last frames when a choice failed after the 200 went out."""
        ...


@dataclass
class OpenAIStream:
    """OpenAI's framing: `data: {chunk}` lines, a usage chunk when asked, then `data: [DONE]`."""

    chunks: ChunkFormat
    include_usage: bool

    def opening(self, choices: int) -> list[str]:
        return [sse(chunk) for index in range(choices) if (chunk := self.chunks.start(index)) is not None]

    def delta(self, index: int, event: Event) -> list[str]:
        chunk = self.chunks.delta(index, event)
        return [sse(chunk)] if chunk is not None else []

    def finish(self, index: int, result: ChoiceResult) -> list[str]:
        return [sse(self.chunks.finish(index, str(result.finish_reason)))]

    def closing(self, usage: dict[str, Any]) -> list[str]:
        return ([sse(self.chunks.usage(usage))] if self.include_usage else []) + [DONE]

    def failed(self, error: TokenferryError) -> list[str]:
        return [sse(status_and_body(error)[1]), DONE]


def stream(choices: Choices, frames: StreamFormat, route: str) -> StreamingResponse:
    """An SSE response: the opening frames, each event's, each choice's closing ones, then the stream's last.
    An error after the 200 goes out in the API's own error frames."""

    async def body() -> AsyncIterator[str]:
        results = [ChoiceResult() for _ in choices.ids]
        for frame in frames.opening(len(results)):
            yield frame
        label = "cancelled"
        try:
            async with contextlib.aclosing(choices.events()) as events:
                async for index, event in events:
                    for frame in frames.delta(index, event):
                        yield frame
                    if not event.final:
                        continue
                    record(results[index], event)
                    if error := failure(results[index]):
                        label = "error" if event.finish_reason is FinishReason.ERROR else "cancelled"
                        for frame in frames.failed(error):
                            yield frame
                        return
                    for frame in frames.finish(index, results[index]):
                        yield frame
            for frame in frames.closing(choices.usage(results)):
                yield frame
            label = outcome(results)
        finally:  # also when the client disconnects: Starlette cancels this generator
            metrics.REQUESTS.labels(route, label).inc()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
