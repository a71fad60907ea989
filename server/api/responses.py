"""OpenAI's Responses API, stateless: POST /v1/responses, for Codex, the OpenAI Agents SDK and the `openai`
package's `responses` client.

The input (a string, or items: messages, function calls and their outputs) is translated into a chat turn
(server/api/chat.py) and runs exactly as a chat completion does; the answer is a list of output items (a
message with its text, then one `function_call` per call), streamed as the Responses event sequence. The
server keeps no state: `store: true` and `previous_response_id` are a 400 saying so, and a client sends the
whole conversation each time, as with `store: false`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from server.api import chat
from server.api.auth import require_api_key
from server.api.blocks import Block, Blocks, Change
from server.api.errors import Unauthorized, documented, status_and_body
from server.api.generation import ChoiceResult, whole
from server.api.streaming import NAMED_EVENTS, generation_responses, named_sse, stream
from server.api.responses_schemas import NAMES, ResponsesRequest
from server.api.state import state_of
from server.errors import TokenferryError
from server.request import Event, FinishReason

RESPONSES_ROUTE = "/v1/responses"
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=documented(Unauthorized))


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text, valid against the tool's parameters once complete
    status: Literal["completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]  # cached_tokens: prompt tokens the prefix cache supplied
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete"]
    incomplete_details: dict[str, str] | None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    usage: ResponseUsage
    error: None


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


@dataclass
class Envelope:
    """What every snapshot of one response shares, and how its items are named."""

    id: str
    model: str
    request: ResponsesRequest
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "incomplete_details": None,
            "model": self.model,
            "output": output,
            "error": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice or "auto",
            "tools": [t.model_dump(by_alias=True) for t in body.tools or ()],
            "store": False,
            "metadata": body.metadata or {},
            **extra,
        }

    def item(self, block: Block, status: str) -> dict[str, Any]:
        """A block as an output item, with `status`; a message's text is complete only when closed."""
        item_id = f"{'fc' if block.call else 'msg'}_{self.id.removeprefix('resp_')}_{block.index}"
        if block.call is None:
            content = [{"type": "output_text", "text": block.text, "annotations": []}] if status != "in_progress" else []
            return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}
        arguments = block.text if status != "in_progress" else ""
        return {"type": "function_call", "id": item_id, "call_id": block.call.id, "name": block.call.name, "arguments": arguments, "status": status}

    def finished(self, result: ChoiceResult, blocks: Blocks, usage: dict[str, Any]) -> dict[str, Any]:
        cut = result.finish_reason is FinishReason.LENGTH
        status = "incomplete" if cut else "completed"
        output = [self.item(block, status) for block in blocks.blocks]
        extra = {"incomplete_details": {"reason": "max_output_tokens"}} if cut else {}
        return self.response(status, output, usage=_usage(usage), **extra)


@dataclass
class ResponsesStream:
    """The Responses event sequence: response.created and .in_progress; per output item its .added, its
    content part or argument deltas, their .done and the item's .done; then response.completed (its status
    "incomplete" when max_output_tokens cut it), or response.failed when the engine failed."""

    envelope: Envelope
    blocks: Blocks
    result: ChoiceResult | None = None
    sequence: int = 0

    def opening(self, choices: int) -> list[str]:
        snapshot = self.envelope.response("in_progress", [])
        return [self._frame("response.created", response=snapshot), self._frame("response.in_progress", response=snapshot)]

    def delta(self, index: int, event: Event) -> list[str]:
        return self._frames(self.blocks.feed(event.text))

    def finish(self, index: int, result: ChoiceResult) -> list[str]:
        self.result = result
        return self._frames(self.blocks.finish())

    def closing(self, usage: dict[str, Any]) -> list[str]:
        assert self.result is not None
        # The last event is response.completed even when max_output_tokens cut the answer (its status says
        # "incomplete"): the `openai` package's stream helper waits for that event, and vLLM sends it too.
        return [self._frame("response.completed", response=self.envelope.finished(self.result, self.blocks, usage))]

    def failed(self, error: TokenferryError) -> list[str]:
        detail = status_and_body(error)[1]["error"]
        response = self.envelope.response("failed", [], error={"code": detail["code"] or detail["type"], "message": detail["message"]})
        return [self._frame("response.failed", response=response)]

    def _frame(self, kind: str, **body: Any) -> str:
        self.sequence += 1
        return named_sse(kind, {"sequence_number": self.sequence - 1, **body})

    def _frames(self, changes: list[Change]) -> list[str]:
        frames = []
        for change in changes:
            block = change.block
            at = {"output_index": block.index}
            item = self.envelope.item(block, "in_progress")
            part = {"item_id": item["id"], **at, "content_index": 0}
            if change.what == "open":
                frames.append(self._frame("response.output_item.added", **at, item=item))
                if block.call is None:
                    frames.append(self._frame("response.content_part.added", **part, part={"type": "output_text", "text": "", "annotations": []}))
            elif change.what == "grow" and block.call is None:
                frames.append(self._frame("response.output_text.delta", **part, delta=change.piece, logprobs=[]))
            elif change.what == "grow":
                frames.append(self._frame("response.function_call_arguments.delta", item_id=item["id"], **at, delta=change.piece))
            else:
                done = self.envelope.item(block, "completed")
                if block.call is None:
                    frames.append(self._frame("response.output_text.done", **part, text=block.text, logprobs=[]))
                    frames.append(self._frame("response.content_part.done", **part, part=done["content"][0]))
                else:
                    frames.append(self._frame("response.function_call_arguments.done", item_id=item["id"], **at, name=block.call.name, arguments=block.text))
                frames.append(self._frame("response.output_item.done", **at, item=done))
        return frames


@router.post(
    RESPONSES_ROUTE.removeprefix("/v1"),
    responses=generation_responses(
        ResponseObject, "The response as JSON; with `stream: true`, the Responses API's Server-Sent Events.", NAMED_EVENTS
    ),
)
async def responses(body: ResponsesRequest, request: Request) -> Response:
    state = state_of(request)
    state.require_engine()
    state.check_model(body.model)
    body.refused()
    started = await chat.start(state, body.turn(), body.sampling_params, {"prompt": "input", "max_tokens": "max_output_tokens"}, NAMES)
    choices, fmt = started.choices, started.fmt
    envelope = Envelope(f"resp_{choices.request_id}", state.model_name, body)
    if body.stream:
        return stream(choices, ResponsesStream(envelope, Blocks(fmt)), RESPONSES_ROUTE)

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        return envelope.finished(results[0], Blocks.read(fmt, "".join(results[0].text)), choices.usage(results))

    return await whole(choices, request, RESPONSES_ROUTE, build)
