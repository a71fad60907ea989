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
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

from server import structured
from server.api import chat
from server.api.auth import require_api_key
from server.api.blocks import Block, Blocks, Change
from server.api.errors import Unauthorized, documented, status_and_body
from server.api.generation import NAMED_EVENTS, ChoiceResult, generation_responses, named_sse, stream, whole
from server.api.schemas import INTEGRAL, LIMIT, Float, Limit, doc
from server.api.state import state_of
from server.errors import InvalidRequest, TokenferryError, require
from server.request import Event, FinishReason, SamplingParams
from server.structured import FUNCTION_NAME
from server.tools import MAX_TOOLS, CallMessage, ToolRequest, parse_tools

RESPONSES_ROUTE = "/v1/responses"
# Fields of the Responses API the server cannot honour: sent with anything but null (or false), a 400.
REFUSED = ("reasoning", "background", "include", "prompt", "max_tool_calls", "top_logprobs", "conversation", "context_management")
STATELESS = "this server keeps no state: send the whole conversation as `input`, with `store` false or absent"
NAMES = {
    r"^tools\[(\d+)\]\.function\.": r"tools[\1].",
    r"^tool_choice\.function\.name$": "tool_choice.name",
    r"^response_format\.json_schema\.": "text.format.",
    r"^response_format": "text.format",
}

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=documented(Unauthorized))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: StrictStr


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[InputText] | StrictStr  # images and files are refused by their part's type


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    arguments: StrictStr  # JSON text of an object


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    output: list[InputText] | StrictStr


def _item_kind(value: Any) -> str | None:
    """An item's type; a message may leave it out ("easy input message")."""
    return value.get("type", "message") if isinstance(value, dict) else None


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionTool(_Strict):
    type: Literal["function"]  # hosted tools (web_search, file_search, ...) are refused by their type
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)] | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: StrictBool | None = None
    description: StrictStr | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Annotated[Literal["medium"] | None, Field(description="only the model's own: 'medium'")] = None


class ResponsesRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI does; those it defines and the server cannot honour are refused.
    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra=lambda schema, cls: schema["properties"].update(
            {name: {"enum": [None, False, []], "description": "not served: a value that asks for something is a 400"} for name in REFUSED}
        ),
    )

    model: Annotated[StrictStr, doc(**{LIMIT: Limit.SERVED_MODEL.value})] | None = None
    input: Annotated[list[Item], Field(min_length=1)] | StrictStr
    instructions: StrictStr | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1), INTEGRAL] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    text: TextConfig | None = None
    stream: StrictBool = False
    store: Annotated[StrictBool | None, doc(enum=[False, None], description=STATELESS)] = None
    previous_response_id: Annotated[StrictStr | None, doc(enum=[None], description=STATELESS)] = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    truncation: Literal["disabled"] | None = None  # "auto" would drop input the client sent

    def refused(self) -> None:
        require(self.store is not True, "store", STATELESS)
        require(self.previous_response_id is None, "previous_response_id", STATELESS)
        extra = self.model_extra or {}
        for name in REFUSED:
            if not _asks_nothing(extra.get(name)):
                raise InvalidRequest(f"{name}: not supported by this server", param=name)

    def turn(self) -> chat.ChatTurn:
        """The input as a chat turn; a function_call_output must answer an earlier function_call."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        made: set[str] = set()
        for index, item in enumerate(items):
            at = f"input[{index}]"
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": _text(item.content)})
            elif isinstance(item, FunctionCallItem):
                call = CallMessage.of(item.call_id, item.name, item.arguments, f"{at}.arguments")
                made.add(item.call_id)
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)  # calls after the assistant's text: one turn
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                require(item.call_id in made, f"{at}.call_id", f"{item.call_id!r} answers no earlier function_call")
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        with chat.named_as(NAMES):
            tools = self._tools()
            return chat.ChatTurn(messages, tools, structured.parse(self._response_format(), tools=tools is not None and tools.calls))

    def _tools(self) -> ToolRequest | None:
        offered = [
            {"type": "function", "function": {"name": t.name, "description": t.description or "", "strict": t.strict,
                                              **({"parameters": t.parameters} if t.parameters is not None else {})}}
            for t in self.tools or ()
        ]  # fmt: skip
        choice: Any = self.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        return parse_tools(offered or None, choice, self.parallel_tool_calls)

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type != "json_schema":
            return {"type": fmt.type} if fmt else None
        spec = {"name": fmt.name, "strict": fmt.strict, **({"schema": fmt.schema_} if fmt.schema_ is not None else {})}
        return {"type": "json_schema", "json_schema": spec}

    def sampling_params(self, grammar: Any) -> SamplingParams:
        values = {"max_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p}
        return SamplingParams(grammar=grammar, **{name: value for name, value in values.items() if value is not None})


def _asks_nothing(value: Any) -> bool:
    """null, false, or an empty list (the Agents SDK always sends `include: []`); 0 is not false, in JSON."""
    return value is None or value is False or (isinstance(value, list) and not value)


def _text(content: str | list[InputText]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


# ---- the answer ----


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
    engine = state.require_engine()
    state.check_model(body.model)
    body.refused()
    turn = body.turn()
    with chat.named_as(NAMES):
        prompt = chat.encode(state, turn)
        grammar = await chat.grammar(state, turn)
    params = body.sampling_params(grammar)
    choices = chat.submit(engine, [prompt], params, {"prompt": "input", "max_tokens": "max_output_tokens"})
    envelope = Envelope(f"resp_{choices.request_id}", state.model_name, body)
    fmt = state.tool_format if turn.calls else None
    if body.stream:
        return stream(choices, ResponsesStream(envelope, Blocks(fmt)), RESPONSES_ROUTE)

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        return envelope.finished(results[0], Blocks.read(fmt, "".join(results[0].text)), choices.usage(results))

    return await whole(choices, request, RESPONSES_ROUTE, build)
