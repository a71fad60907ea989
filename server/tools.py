"""Tool calls: the formats models are trained on, the grammar that holds a call to its tool's schema, the
tool conversation as the model reads it, and the calls read back out of an answer as it streams.

A model calls tools in the text format it was trained on. Three are common, and `detect` tells them from the
chat template (a flag overrides):
- `hermes` (Hermes, Qwen, SmolLM and most ChatML models): text, then `<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>`, one block per call;
- `llama3_json` (Llama 3.x): the whole answer is one `{"name": ..., "parameters": {...}}`;
- `mistral`: text, then `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
A template with none of them gets `hermes`, with the tools described in a system message (`describe`).

`tool_choice` "auto" is a lazy constraint: free text until the format's opening marker, then every byte of the
calls is held to the grammar, each call's arguments to its own tool's schema (llguidance's `lazy` lexeme).
"required" and a named function constrain the answer from its first token. So a call the server returns always
parses, and its arguments are valid against its tool's schema; server/call_reader.py reads the calls back out
of an answer as it streams, relying on the layout the grammar fixed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.config import TOOL_CALL_FORMATS
from server.errors import InvalidRequest, require
from server.structured import FUNCTION_NAME, JSON_WHITESPACE, GrammarSpec

MAX_TOOLS = 128
TOOL_CHOICES = "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes its calls: `open`, then each call as `before` + object + `after` with
    `between` between two calls, then `close`; an object is `{"name": "<name>", "<key>": <arguments>}`."""

    name: str
    trigger: str  # what announces the calls; in "auto", free text runs until it
    open: str
    before: str
    after: str
    between: str
    close: str
    key: str  # the arguments' key in a call object
    text_before: bool  # whether text may precede the calls (else an answer is text or calls, from its start)
    parallel: bool  # whether the format holds several calls

    def call_text(self, name: str, arguments: str) -> str:
        return f'{self.before}{{"name": "{name}", "{self.key}": {arguments}}}{self.after}'

    def render(self, calls: Sequence[tuple[str, str]]) -> str:
        """The calls as the model writes them: (name, arguments as JSON text) each."""
        return self.open + self.between.join(self.call_text(n, a) for n, a in calls) + self.close


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "", "<tool_call>\n", "\n</tool_call>", "\n", "", "arguments", True, True),
    "llama3_json": ToolFormat("llama3_json", "{", "", "", "", "", "", "parameters", False, False),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "[TOOL_CALLS][", "", "", ", ", "]", "arguments", True, True),
}
assert ("auto", *FORMATS) == TOOL_CALL_FORMATS, "server/config.py names the formats for --tool-call-format"


def detect(template: str | None, override: str = "auto") -> ToolFormat:
    """The tool-call format of a chat template: `override` unless "auto", else the one the template spells."""
    if override != "auto":
        return FORMATS[override]
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return FORMATS["mistral"]
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and "parameters" in text):
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]  # `<tool_call>` templates, and the fallback for those without tools


# ---- what a request asks for ----


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]
    index: int  # its place in `tools`, for error messages

    def tool(self) -> dict[str, Any]:
        """As OpenAI's `tools` list (and chat templates) hold it."""
        body: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            body["description"] = self.description
        return {"type": "function", "function": body}


@dataclass(frozen=True)
class ToolRequest:
    """The tools offered and how the answer may use them."""

    functions: tuple[Function, ...]
    choice: str  # "auto", "required", "named", or "none" (the model sees the tools and answers in text)
    named: str | None = None  # the function a named choice forces
    parallel: bool = True

    @property
    def calls(self) -> bool:
        """Whether the answer may hold calls (held to the grammar and read back out)."""
        return self.choice != "none"

    def offered(self) -> tuple[Function, ...]:
        """The functions the answer may call."""
        return tuple(f for f in self.functions if self.named in (None, f.name))


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolRequest | None:
    """The request's tools and tool_choice, validated; None when no tools are offered. Under tool_choice "none"
    the model still sees the tools (a conversation keeps its prompt), but answers in text. Raises
    InvalidRequest naming the field at fault."""
    if not (tool_choice in (None, "none", "auto", "required") or isinstance(tool_choice, dict)):
        raise InvalidRequest(f"tool_choice: {TOOL_CHOICES}, got {tool_choice!r}", param="tool_choice")
    require(parallel_tool_calls is None or isinstance(parallel_tool_calls, bool), "parallel_tool_calls", "must be a boolean")
    if tools is not None:
        require(isinstance(tools, list), "tools", "must be a list")
        require(len(tools) <= MAX_TOOLS, "tools", f"at most {MAX_TOOLS} tools")
    functions = _functions(tools or [])
    if not functions:
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise InvalidRequest("tool_choice: a tool was required but no tools were given", param="tool_choice")
        return None
    parallel = parallel_tool_calls is not False
    if tool_choice == "none":
        return ToolRequest(functions, "none", None, parallel)
    if tool_choice in (None, "auto", "required"):
        return ToolRequest(functions, tool_choice or "auto", None, parallel)
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    require(tool_choice.get("type", "function") == "function" and isinstance(name, str), "tool_choice", TOOL_CHOICES)
    require(any(f.name == name for f in functions), "tool_choice.function.name", f"no tool is called {name!r}")
    return ToolRequest(functions, "named", name, parallel=False)


def _functions(tools: list[Any]) -> tuple[Function, ...]:
    functions: dict[str, Function] = {}
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        require(isinstance(tool, dict) and tool.get("type", "function") == "function", param,
                 "must be {'type': 'function', 'function': {...}}")  # fmt: skip
        function = tool.get("function")
        require(isinstance(function, dict), f"{param}.function", "must be an object")
        name = function.get("name")
        require(isinstance(name, str) and FUNCTION_NAME.match(name) is not None, f"{param}.function.name",
                 "must be 1 to 64 letters, digits, '_', '-' or '.'")  # fmt: skip
        require(name not in functions, f"{param}.function.name", f"duplicate function name {name!r}")
        description = function.get("description", "")
        require(isinstance(description, str), f"{param}.function.description", "must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        require(isinstance(parameters, dict), f"{param}.function.parameters", "must be a JSON schema object")
        require(function.get("strict") is None or isinstance(function.get("strict"), bool), f"{param}.function.strict",
                 "must be a boolean")  # fmt: skip
        functions[name] = Function(name, description, parameters, index)
    return tuple(functions.values())


def arguments_schema(function: Function) -> dict[str, Any]:
    """The schema a call's arguments are held to, with JSON's whitespace bounded as in structured output
    (llguidance's x-guidance), so whitespace alone cannot run an answer to max_tokens."""
    return {**function.parameters, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}


def specs(fmt: ToolFormat, request: ToolRequest) -> tuple[GrammarSpec, list[GrammarSpec]]:
    """The answer's grammar, and each offered function's arguments alone: compiled only when the whole is
    refused, to name the tool whose schema the backend cannot enforce."""
    parts = [
        GrammarSpec("json_schema", json.dumps(f.parameters, sort_keys=True, ensure_ascii=False), f"tools[{f.index}].function.parameters")
        for f in request.offered()
    ]
    return GrammarSpec("lark", grammar(fmt, request), "tools"), parts


def grammar(fmt: ToolFormat, request: ToolRequest) -> str:
    """A Lark grammar (llguidance's dialect) for the answer: each call's object is one alternative per function
    offered, its arguments that function's schema; in "auto", free text until `fmt.trigger` (a lazy lexeme)."""
    functions = request.offered()
    several = fmt.parallel and request.parallel and request.choice != "named"
    objects = [
        f'{_lit("{" + json.dumps("name") + ": " + json.dumps(f.name) + ", " + json.dumps(fmt.key) + ": ")} args_{i} {_lit("}")}'
        for i, f in enumerate(functions)
    ]
    lines = ["%llguidance {}", "obj: " + " | ".join(objects)]
    lines += [f"args_{i}: %json {json.dumps(arguments_schema(f), ensure_ascii=False)}" for i, f in enumerate(functions)]
    call = " ".join(x for x in (_lit(fmt.before), "obj", _lit(fmt.after)) if x)
    more = f" ({' '.join(x for x in (_lit(fmt.between), call) if x)})*" if several else ""
    lines.append(f"calls: {' '.join(x for x in (_lit(fmt.open), call) if x)}{more}{' ' + _lit(fmt.close) if fmt.close else ''}")
    if request.choice != "auto":
        lines.append("start: calls")
    elif fmt.text_before:
        # NOTE: the calls begin with the trigger (it is a prefix of open + before): the lazy head stops at the first
        # trigger, and `rest` is the calls less that prefix.
        opening = fmt.open + fmt.before
        assert opening.startswith(fmt.trigger), fmt
        rest = opening[len(fmt.trigger) :]
        lines += [
            "start: TEXT | head rest",
            "TEXT: /(.|\\n)*/",
            f"head[lazy]: TEXT {_lit(fmt.trigger)}",
            f"rest: {' '.join(x for x in (_lit(rest), 'obj', _lit(fmt.after)) if x)}{more}{' ' + _lit(fmt.close) if fmt.close else ''}",
        ]
    else:
        # An answer is either text that does not start like the calls, or the calls alone.
        first = re.escape(fmt.trigger[0])
        lines += ["start: PLAIN | calls", f"PLAIN: /([^{first}](.|\\n)*)?/"]
    return "\n".join(lines) + "\n"


def _lit(text: str) -> str:
    """A Lark string literal for `text` ('' for none)."""
    return json.dumps(text, ensure_ascii=False) if text else ""


def describe(fmt: ToolFormat, request: ToolRequest) -> str:
    """The tools and how to call them, for a chat template that cannot render tools itself (a system message)."""
    signatures = "\n".join(json.dumps(f.tool()["function"], ensure_ascii=False) for f in request.offered())
    example = fmt.render([("<function name>", "<arguments as a JSON object>")])
    if request.choice == "named":
        how = f"Call the function {request.named!r} now, written exactly as: {example}"
    else:
        how = f"To call a function, write exactly: {example}"
        if fmt.parallel and request.parallel:
            how += " You may call several at once."
        how += " You must call a function now." if request.choice == "required" else " If no function helps, answer in plain text."
    return f"You can call these functions, each given as a JSON signature:\n{signatures}\n\n{how}"


# ---- the conversation ----


@dataclass(frozen=True)
class CallMessage:
    """One call an assistant message made, as a later turn sends it back."""

    id: str
    name: str
    arguments: str  # JSON text of an object

    @classmethod
    def of(cls, id: str, name: str, arguments: str, param: str) -> CallMessage:
        """A call sent back by a client; its arguments must be a JSON object (else a 400 naming `param`)."""
        try:
            ok = isinstance(json.loads(arguments), dict)
        except ValueError:
            ok = False
        require(ok, param, "must be a JSON object, as the call was answered")
        return cls(id, name, arguments)


def conversation(messages: Sequence[dict[str, Any]], fmt: ToolFormat, native: bool) -> list[dict[str, Any]]:
    """Messages as the chat template takes them, a tool conversation included.

    `messages` are {"role", "content", "tool_calls" (CallMessage list), "tool_call_id"} as the API read them.
    A template that renders tools itself (`native`) gets assistant `tool_calls` (arguments as objects, as
    templates expect) and `tool` messages; any other gets the calls written into the assistant's text in `fmt`
    and each result as a user message, so the model sees the call and its result either way.
    """
    rendered = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        calls: Sequence[CallMessage] = message.get("tool_calls") or ()
        if role == "assistant" and calls:
            if native:
                tool_calls = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                    for c in calls
                ]
                rendered.append({"role": "assistant", "content": content, "tool_calls": tool_calls})
            else:
                rendered.append({"role": "assistant", "content": content + fmt.render([(c.name, c.arguments) for c in calls])})
        elif role == "tool":
            if native:
                rendered.append({"role": "tool", "tool_call_id": message["tool_call_id"], "content": content})
            else:
                rendered.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            rendered.append({"role": role, "content": content})
    return rendered


def check_answers(messages: Sequence[dict[str, Any]]) -> None:
    """Every `tool` message answers a call an earlier assistant message made (else a 400 naming it)."""
    made: set[str] = set()
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            made.add(call.id)
        if message["role"] == "tool" and message.get("tool_call_id") not in made:
            raise InvalidRequest(
                f"messages[{index}].tool_call_id: {message.get('tool_call_id')!r} answers no earlier tool call",
                param=f"messages[{index}].tool_call_id",
            )
