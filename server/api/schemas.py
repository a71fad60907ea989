"""OpenAI-compatible request bodies: chat and completions, on the fields they share (sampling_fields.py). Unknown fields are ignored, as OpenAI does; fields that OpenAI or vLLM
define and the server cannot honour are refused by name (see `unsupported`) rather than silently dropped.

Types are strict: a string where a number belongs is a 400, not a guess.

The OpenAPI document is generated from these classes and must admit exactly what the server accepts. Some
checks live elsewhere (SamplingParams, the engine, `prompts`, `template_messages`), because their errors
name the field better than pydantic's do inside a union; `doc(...)` states them in the document only, and
the fuzz test (tests/api/test_fuzz.py) holds the two to agreeing.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt, StrictStr

from server import structured
from server.api.fields import INTEGRAL, LIMIT, TOOL, TOOL_CHOICE, Limit, TokenIds, doc
from server.api.messages import ChatMessage, template_messages
from server.api.sampling_fields import BEAM_RULE, MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS, SamplingFields, is_neutral, requires
from server.errors import InvalidRequest
from server.tools import MAX_TOOLS, ToolRequest, parse_tools


class ChatCompletionRequest(SamplingFields):
    rules = [requires("top_logprobs", {"type": "integer", "minimum": 1}, "logprobs", True), BEAM_RULE]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1), INTEGRAL] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS, description="only with logprobs: true"), INTEGRAL] | None = None
    tools: Annotated[list[dict[str, Any]] | None, doc(maxItems=MAX_TOOLS, items=TOOL)] = None
    tool_choice: Annotated[Any, doc(anyOf=TOOL_CHOICE)] = None
    parallel_tool_calls: StrictBool | None = None
    functions: Annotated[list[Any] | None, doc(maxItems=0)] = None
    function_call: Annotated[Any, doc(enum=[None, "none"])] = None

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        if self.functions:
            refused.append("functions")
        if self.function_call not in (None, "none"):
            refused.append("function_call")
        if not is_neutral((self.model_extra or {}).get("echo")):  # vLLM's chat echo (of the last message)
            refused.append("echo")
        return refused

    def check_relations(self) -> None:
        super().check_relations()
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")

    @property
    def output_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_request(self) -> ToolRequest | None:
        """The tools offered and how the answer may use them, validated; None when it is free text."""
        return parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def constraint(self) -> structured.Constraint | None:
        """The structured-output constraint asked for besides tools, validated; None for none."""
        tools = self.tool_request()
        return structured.parse(self.response_format, self.structured_outputs, tools=tools is not None and tools.calls)

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output budget and the name the client gave it (max_completion_tokens wins, as in OpenAI)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


# A prompt in each of its forms; `prompts` refuses the empty ones (and the engine, token ids out of range).
Text = Annotated[StrictStr, doc(minLength=1)]
PromptIds = Annotated[TokenIds, doc(minItems=1, **{LIMIT: Limit.PROMPT_IDS.value})]


class CompletionRequest(SamplingFields):
    rules = [requires("max_tokens", {"const": 0}, "echo", True), BEAM_RULE]
    prompt: Text | Annotated[list[Text], doc(minItems=1)] | PromptIds | Annotated[list[PromptIds], doc(minItems=1)]
    # 0 new tokens, with echo: the prompt alone, with its scores when logprobs is set (what evaluation harnesses ask).
    max_tokens: Annotated[StrictInt, Field(ge=0, description="0 only with echo"), INTEGRAL] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS), INTEGRAL] | None = None
    echo: StrictBool = False
    suffix: Annotated[StrictStr | None, doc(maxLength=0)] = None

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        if self.suffix:
            refused.append("suffix")
        return refused

    @property
    def output_logprobs(self) -> int | None:
        return self.logprobs

    def check_relations(self) -> None:
        super().check_relations()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens: must be at least 1 (0 only with echo)", param="max_tokens")

    @property
    def prompt_logprobs(self) -> int | None:
        """Echo with logprobs scores the prompt too; echo of no new tokens still runs the prompt, to check it."""
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            return self.logprobs or 0
        return None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text to tokenize, or token ids as given."""
        prompt = self.prompt
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if not all(prompt):
            raise InvalidRequest("prompt: no prompt in the list may be empty", param="prompt")
        return list(prompt)  # type: ignore[arg-type]
