"""Chat messages as OpenAI's chat (and vLLM's /tokenize) send them, and the conversation they make for the chat
template: known roles, text content, the calls an assistant made, the call a tool message answers."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StrictStr, WithJsonSchema

from server import structured
from server.api.fields import doc
from server.errors import InvalidRequest, require
from server.tools import CallMessage, check_answers


class TextPart(BaseModel):
    # Only text parts are served: `_text_of` refuses the others, naming their message.
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"required": ["type", "text"]})
    type: Annotated[StrictStr, doc(enum=["text"])]
    text: Annotated[StrictStr | None, WithJsonSchema({"type": "string"})] = None


ROLES = ("system", "developer", "user", "assistant", "tool")


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: Annotated[StrictStr, doc(pattern=structured.FUNCTION_NAME.pattern)]
    arguments: StrictStr  # JSON text, as the call was answered


class ToolCall(BaseModel):
    """A call an earlier assistant message made, sent back with the conversation."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: Annotated[StrictStr, doc(minLength=1)]
    type: Annotated[StrictStr, doc(enum=["function"])] = "function"
    function: FunctionCall


# A tool message names the call it answers; that it answers an earlier one is `template_messages`' 400.
TOOL_ANSWERS = {
    "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
    "then": {"properties": {"tool_call_id": {"type": "string"}}, "required": ["tool_call_id"]},
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=TOOL_ANSWERS)
    role: Annotated[StrictStr, doc(enum=list(ROLES))]  # `template_messages` checks, naming the message
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls they made
    tool_call_id: StrictStr | None = None  # tool messages: the call they answer


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as server/tools.py's `conversation` takes them: known roles, plain string content, the
    calls an assistant made, the call a tool message answers (which must be an earlier one)."""
    result: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"messages[{index}].role: unsupported role {message.role!r}; expected one of {', '.join(ROLES)}",
                param=f"messages[{index}].role",
            )
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": _text_of(message.content, index)}
        if message.tool_calls and role == "assistant":
            calls = message.tool_calls
            entry["tool_calls"] = [
                CallMessage.of(c.id, c.function.name, c.function.arguments, f"messages[{index}].tool_calls[{j}].function.arguments")
                for j, c in enumerate(calls)
            ]
        if role == "tool":
            require(message.tool_call_id is not None, f"messages[{index}].tool_call_id", "a tool message needs the id of the call it answers")
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    check_answers(result)
    return result


def _text_of(content: str | list[TextPart] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"messages[{index}].content[{part_index}]: only text parts are supported, got {part.type!r}",
                param=f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)
