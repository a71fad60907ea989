"""Anthropic's Messages API request bodies, and their translation into a chat turn (server/api/chat.py).

Fields Anthropic defines that the server cannot honour are refused by name; `cache_control` is accepted everywhere:
the prefix cache reuses every shared prefix without being asked.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server import structured
from server.api import chat
from server.api.fields import INTEGRAL, LIMIT, Float, Limit, StopText, Strict, doc
from server.errors import InvalidRequest, require
from server.request import MAX_STOP_STRINGS, SamplingParams
from server.structured import FUNCTION_NAME
from server.tools import MAX_TOOLS, CallMessage, ToolRequest, parse_tools

# Fields of the Messages API the server cannot honour: sent with a value, a 400 naming them.
REFUSED = ("container", "mcp_servers", "context_management", "inference_geo", "speed", "diagnostics", "user_profile_id", "workspace_id")
# Where tools and tool_choice errors are named as OpenAI's chat names them, Anthropic's names instead.
NAMES = {
    r"^tools\[(\d+)\]\.function\.parameters": r"tools[\1].input_schema",
    r"^tools\[(\d+)\]\.function\.": r"tools[\1].",
    r"^tool_choice\.function\.name$": "tool_choice.name",
    r"^response_format\.json_schema\.schema": "output_config.format.schema",
}


class TextBlock(Strict):
    type: Literal["text"]
    text: StrictStr
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[StrictStr, Field(min_length=1)]
    content: list[TextBlock] | StrictStr = ""
    is_error: StrictBool = False
    cache_control: dict[str, Any] | None = None


# Images, documents and thinking blocks are refused by pydantic, naming the block and its type.
ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: list[ContentBlock] | StrictStr  # the list first: its errors name the block at fault


class Tool(Strict):
    type: Literal["custom"] | None = None  # server tools (bash, web search, ...) are refused by their type
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    description: StrictStr | None = None
    input_schema: Annotated[dict[str, Any], doc(properties={"type": {"const": "object"}}, required=["type"])]
    cache_control: dict[str, Any] | None = None


class ChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: StrictBool = False


class ChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: StrictBool = False


class ChoiceTool(Strict):
    type: Literal["tool"]
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME.pattern)]
    disable_parallel_tool_use: StrictBool = False


class ChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = Annotated[ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone, Field(discriminator="type")]


class Thinking(Strict):
    type: Annotated[Literal["disabled"], Field(description="extended thinking is not served: only 'disabled'")]


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(Strict):
    effort: Annotated[None, Field(description="not served: a value is a 400")] = None
    format: OutputFormat | None = None  # structured output, as response_format's json_schema


class Metadata(Strict):
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
        return SamplingParams.given(
            max_tokens=self.max_tokens,
            stop=tuple(self.stop_sequences or ()),
            grammar=grammar,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )
