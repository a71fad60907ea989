"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens, for clients such as Claude Code
(`ANTHROPIC_BASE_URL`) and the `anthropic` package.

The body is translated into a chat turn (server/api/chat.py) and runs exactly as a chat completion does; the
answer comes back as Anthropic's content blocks (`text`, `tool_use`), and streamed as its events. Errors on
these routes take Anthropic's shape (server/api/errors.py). Fields Anthropic defines that the server cannot
honour (extended thinking, server tools, MCP servers, containers) are a 400 naming them. `cache_control` is
accepted everywhere: the prefix cache reuses every shared prefix without being asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from server.api import chat
from server.api.auth import require_api_key
from server.api.blocks import Blocks, Change
from server.api.errors import ModelNotFound, PayloadTooLarge, Unauthorized, documented, status_and_body
from server.api.generation import ChoiceResult, whole
from server.api.streaming import NAMED_EVENTS, generation_responses, named_sse, stream
from server.api.anthropic_schemas import CountTokensRequest, MessagesRequest, NAMES
from server.api.state import AppState, state_of
from server.errors import EngineUnavailable, InvalidRequest, TokenferryError
from server.request import Event, FinishReason

MESSAGES_ROUTE = "/v1/messages"
COUNT_ROUTE = "/v1/messages/count_tokens"
router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    responses=documented(Unauthorized, PayloadTooLarge, anthropic=True),  # over the app's OpenAI-shaped 413
)


class TextOut(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]  # valid against the tool's input_schema


class MessageUsage(BaseModel):
    input_tokens: int  # prompt tokens computed
    output_tokens: int
    cache_read_input_tokens: int  # prompt tokens whose KV came from the prefix cache
    cache_creation_input_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: MessageUsage


class TokenCount(BaseModel):
    input_tokens: int


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage (Choices.usage) in Anthropic's terms: cache reads are not counted as input."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "input_tokens": usage["prompt_tokens"] - cached,
        "output_tokens": usage["completion_tokens"],
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _stop_reason(result: ChoiceResult, blocks: Blocks) -> tuple[str, str | None]:
    if result.finish_reason is FinishReason.LENGTH:
        return "max_tokens", None
    if blocks.calls:
        return "tool_use", None
    if result.stop_string is not None:
        return "stop_sequence", result.stop_string
    return "end_turn", None


def _content(blocks: Blocks) -> list[dict[str, Any]]:
    """The answer's blocks; a call max_tokens cut short is left out (its arguments are not yet an object)."""
    content: list[dict[str, Any]] = []
    for block in blocks.blocks:
        if block.call is None:
            content.append({"type": "text", "text": block.text})
        elif (arguments := _object(block.text)) is not None:
            content.append({"type": "tool_use", "id": block.call.id, "name": block.call.name, "input": arguments})
    return content


def _object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class AnthropicStream:
    """Anthropic's event stream for one message: message_start and a ping, each block's start, deltas and
    stop, then message_delta (stop reason, usage) and message_stop; a failure after the start is an error event."""

    message: dict[str, Any]  # the message_start's message
    blocks: Blocks
    stop: dict[str, Any] = field(default_factory=dict)  # stop_reason and stop_sequence, once finished

    def opening(self, choices: int) -> list[str]:
        return [named_sse("message_start", {"message": self.message}), named_sse("ping", {})]

    def delta(self, index: int, event: Event) -> list[str]:
        return self._frames(self.blocks.feed(event.text))

    def finish(self, index: int, result: ChoiceResult) -> list[str]:
        frames = self._frames(self.blocks.finish())
        reason, sequence = _stop_reason(result, self.blocks)
        self.stop = {"stop_reason": reason, "stop_sequence": sequence}
        return frames

    def closing(self, usage: dict[str, Any]) -> list[str]:
        delta = named_sse("message_delta", {"delta": self.stop, "usage": _usage(usage)})
        return [delta, named_sse("message_stop", {})]

    def failed(self, error: TokenferryError) -> list[str]:
        body = status_and_body(error, MESSAGES_ROUTE)[1]
        return [named_sse("error", {"error": body["error"]})]

    def _frames(self, changes: list[Change]) -> list[str]:
        frames = []
        for change in changes:
            block, index = change.block, change.block.index
            if change.what == "open":
                start = (
                    {"type": "text", "text": ""}
                    if block.call is None
                    else {"type": "tool_use", "id": block.call.id, "name": block.call.name, "input": {}}
                )
                frames.append(named_sse("content_block_start", {"index": index, "content_block": start}))
            elif change.what == "grow":
                delta = (
                    {"type": "text_delta", "text": change.piece}
                    if block.call is None
                    else {"type": "input_json_delta", "partial_json": change.piece}
                )
                frames.append(named_sse("content_block_delta", {"index": index, "delta": delta}))
            else:
                frames.append(named_sse("content_block_stop", {"index": index}))
        return frames


@router.post(
    MESSAGES_ROUTE.removeprefix("/v1"),
    responses=generation_responses(
        MessageResponse, "The message as JSON; with `stream: true`, Anthropic's Server-Sent Events.", NAMED_EVENTS, anthropic=True
    ),
)
async def messages(body: MessagesRequest, request: Request) -> Response:
    state = state_of(request)
    _prepare(state, body)
    started = await chat.start(state, body.turn(), body.sampling_params, {"prompt": "messages"}, NAMES)
    choices, fmt = started.choices, started.fmt
    message_id = f"msg_{choices.request_id}"
    if body.stream:
        start = _message(message_id, state.model_name, [], None, None)
        start["usage"] = {"input_tokens": len(started.prompt), "output_tokens": 0}
        return stream(choices, AnthropicStream(start, Blocks(fmt)), MESSAGES_ROUTE)

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        blocks = Blocks.read(fmt, "".join(results[0].text))
        reason, sequence = _stop_reason(results[0], blocks)
        return {**_message(message_id, state.model_name, _content(blocks), reason, sequence), "usage": _usage(choices.usage(results))}

    return await whole(choices, request, MESSAGES_ROUTE, build)


@router.post(COUNT_ROUTE.removeprefix("/v1"), response_model=TokenCount, responses=documented(InvalidRequest, ModelNotFound, EngineUnavailable, anthropic=True))
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    state = state_of(request)
    _prepare(state, body)
    with chat.named_as(NAMES):
        return {"input_tokens": len(chat.encode(state, body.turn()))}


def _prepare(state: AppState, body: CountTokensRequest) -> None:
    state.require_engine()
    state.check_model(body.model)
    body.refused()


def _message(
    message_id: str, model: str, content: list[dict[str, Any]], reason: str | None, sequence: str | None
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
    }

