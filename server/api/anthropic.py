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
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server.api import chat
from server.api.auth import require_api_key
from server.api.blocks import Blocks, Change
from server.api.errors import ModelNotFound, PayloadTooLarge, Unauthorized, documented, status_and_body
from server.api.generation import NAMED_EVENTS, ChoiceResult, generation_responses, named_sse, stream, whole
from server.api.schemas import INTEGRAL, LIMIT, Float, Limit, StopText, doc
from server.api.state import AppState, state_of
from server.errors import EngineUnavailable, InvalidRequest, TokenferryError, require
from server.request import MAX_STOP_STRINGS, Event, FinishReason, SamplingParams
from server import structured
from server.structured import FUNCTION_NAME
from server.tools import MAX_TOOLS, CallMessage, ToolRequest, parse_tools

MESSAGES_ROUTE = "/v1/messages"
COUNT_ROUTE = "/v1/messages/count_tokens"
# Fields of the Messages API the server cannot honour: sent with a value, a 400 naming them.
REFUSED = ("container", "mcp_servers", "context_management", "inference_geo", "speed", "diagnostics", "user_profile_id", "workspace_id")
# Where tools and tool_choice errors are named as OpenAI's chat names them, Anthropic's names instead.
NAMES = {
    r"^tools\[(\d+)\]\.function\.parameters": r"tools[\1].input_schema",
    r"^tools\[(\d+)\]\.function\.": r"tools[\1].",
    r"^tool_choice\.function\.name$": "tool_choice.name",
    r"^response_format\.json_schema\.schema": "output_config.format.schema",
}

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    responses=documented(Unauthorized, PayloadTooLarge, anthropic=True),  # over the app's OpenAI-shaped 413
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: StrictStr
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[StrictStr, Field(min_length=1)]
    content: list[TextBlock] | StrictStr = ""
    is_error: StrictBool = False
    cache_control: dict[str, Any] | None = None


# Images, documents and thinking blocks are refused by pydantic, naming the block and its type.
ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: list[ContentBlock] | StrictStr  # the list first: its errors name the block at fault


class Tool(_Strict):
    type: Literal["custom"] | None = None  # server tools (bash, web search, ...) are refused by their type
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    description: StrictStr | None = None
    input_schema: Annotated[dict[str, Any], doc(properties={"type": {"const": "object"}}, required=["type"])]
    cache_control: dict[str, Any] | None = None


class ChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: StrictBool = False


class ChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: StrictBool = False


class ChoiceTool(_Strict):
    type: Literal["tool"]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    disable_parallel_tool_use: StrictBool = False


class ChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone, Field(discriminator="type")]


class Thinking(_Strict):
    type: Annotated[Literal["disabled"], Field(description="extended thinking is not served: only 'disabled'")]


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(_Strict):
    effort: Annotated[None, Field(description="not served: a value is a 400")] = None
    format: OutputFormat | None = None  # structured output, as response_format's json_schema


class Metadata(_Strict):
    user_id: StrictStr | None = None


class CountTokensRequest(BaseModel):
    """What a prompt is made of: the model, the system prompt, the conversation and the tools."""

    # Unknown fields are ignored, as Anthropic does; those it defines and the server cannot honour are refused.
    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra=lambda schema, cls: schema["properties"].update(
            {name: {"enum": [None], "description": "not served: a value is a 400"} for name in REFUSED}
        ),
    )

    model: Annotated[StrictStr, doc(**{LIMIT: Limit.SERVED_MODEL.value})]
    messages: Annotated[list[Message], Field(min_length=1)]
    system: list[TextBlock] | StrictStr | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # the prefix cache reuses shared prefixes unasked

    def refused(self) -> None:
        extra = self.model_extra or {}
        for name in REFUSED:
            if extra.get(name) is not None:
                raise InvalidRequest(f"{name}: not supported by this server", param=name)

    def turn(self) -> chat.ChatTurn:
        """The request as a chat turn; a tool_result must answer an earlier tool_use (else a 400 naming it)."""
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            text = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            messages.append({"role": "system", "content": text})
        made: set[str] = set()
        for index, message in enumerate(self.messages):
            messages += _translate(message, f"messages[{index}]", made)
        last = len(self.messages) - 1
        require(self.messages[last].role == "user", f"messages[{last}].role",
                "the conversation must end with a user message: continuing an assistant's (prefill) is not supported")  # fmt: skip
        tools = self._tools()
        output = self.output_config.format if self.output_config else None
        json_schema = {"type": "json_schema", "json_schema": {"name": "output", "schema": output.schema_}} if output else None
        with chat.named_as(NAMES):
            return chat.ChatTurn(messages, tools, structured.parse(json_schema, tools=tools is not None and tools.calls))

    def _tools(self) -> ToolRequest | None:
        for index, tool in enumerate(self.tools or ()):
            require(tool.input_schema.get("type") == "object", f"tools[{index}].input_schema", "must be a JSON schema of type 'object'")
        offered = [
            {"type": "function", "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema}}
            for t in self.tools or ()
        ]
        choice: Any = None
        parallel = True
        if self.tool_choice is not None:
            kind = self.tool_choice.type
            choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
            if isinstance(self.tool_choice, ChoiceTool):
                choice = {"type": "function", "function": {"name": self.tool_choice.name}}
            parallel = not getattr(self.tool_choice, "disable_parallel_tool_use", False)
        with chat.named_as(NAMES):
            return parse_tools(offered or None, choice, parallel)


def _translate(message: Message, where: str, made: set[str]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: its text and calls, and each tool result as a tool message."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[CallMessage] = []
    for index, block in enumerate(message.content):
        at = f"{where}.content[{index}]"
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            require(message.role == "assistant", at, "tool_use blocks belong in assistant messages")
            calls.append(CallMessage(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
            made.add(block.id)
        else:
            require(message.role == "user", at, "tool_result blocks belong in user messages")
            require(block.tool_use_id in made, f"{at}.tool_use_id", f"{block.tool_use_id!r} answers no earlier tool_use")
            content = block.content if isinstance(block.content, str) else "".join(b.text for b in block.content)
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": ("Error: " if block.is_error else "") + content})
    rest = [{"role": message.role, "content": "".join(texts), **({"tool_calls": calls} if calls else {})}]
    return results + (rest if texts or calls or not results else [])


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[StrictInt, Field(ge=1), INTEGRAL]
    temperature: Annotated[Float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0), INTEGRAL] | None = None
    stop_sequences: Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: StrictBool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: both mean it

    def sampling_params(self, grammar: Any) -> SamplingParams:
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return SamplingParams(
            max_tokens=self.max_tokens,
            stop=tuple(self.stop_sequences or ()),
            grammar=grammar,
            **{name: value for name, value in values.items() if value is not None},
        )


# ---- the answers ----


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
        body = status_and_body(error, anthropic=True)[1]
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
    engine = _prepare(state, body)
    turn = body.turn()
    with chat.named_as(NAMES):
        prompt = chat.encode(state, turn)
        grammar = await chat.grammar(state, turn)
    choices = chat.submit(engine, [prompt], body.sampling_params(grammar), {"prompt": "messages"})
    message_id = f"msg_{choices.request_id}"
    fmt = state.tool_format if turn.calls else None
    if body.stream:
        start = _message(message_id, state.model_name, [], None, None)
        start["usage"] = {"input_tokens": len(prompt), "output_tokens": 0}
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


def _prepare(state: AppState, body: CountTokensRequest) -> Any:
    engine = state.require_engine()
    state.check_model(body.model)
    body.refused()
    return engine


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

