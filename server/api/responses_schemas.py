"""OpenAI's Responses API request bodies, and their translation into a chat turn (server/api/chat.py).

The server keeps no state: `store: true` and `previous_response_id` are refused, saying so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

from server import structured
from server.api import chat
from server.api.fields import INTEGRAL, LIMIT, Float, Limit, Strict, doc
from server.errors import InvalidRequest, require
from server.request import SamplingParams
from server.structured import FUNCTION_NAME
from server.tools import MAX_TOOLS, CallMessage, ToolRequest, parse_tools

# Fields of the Responses API the server cannot honour: sent with anything that asks for something, a 400.
REFUSED = ("reasoning", "background", "include", "prompt", "max_tool_calls", "top_logprobs", "conversation", "context_management")
STATELESS = "this server keeps no state: send the whole conversation as `input`, with `store` false or absent"
NAMES = {
    r"^tools\[(\d+)\]\.function\.": r"tools[\1].",
    r"^tool_choice\.function\.name$": "tool_choice.name",
    r"^response_format\.json_schema\.": "text.format.",
    r"^response_format": "text.format",
}


class InputText(Strict):
    type: Literal["input_text", "output_text"]
    text: StrictStr


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[InputText] | StrictStr  # images and files are refused by their part's type


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    arguments: StrictStr  # JSON text of an object


class FunctionCallOutputItem(Strict):
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


class FunctionTool(Strict):
    type: Literal["function"]  # hosted tools (web_search, file_search, ...) are refused by their type
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)] | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: StrictBool | None = None
    description: StrictStr | None = None


class TextConfig(Strict):
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
        return SamplingParams.given(
            max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p, grammar=grammar
        )


def _asks_nothing(value: Any) -> bool:
    """null, false, or an empty list (the Agents SDK always sends `include: []`); 0 is not false, in JSON."""
    return value is None or value is False or (isinstance(value, list) and not value)


def _text(content: str | list[InputText]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)
