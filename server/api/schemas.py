"""OpenAI-compatible request bodies. Unknown fields are ignored, as OpenAI does; fields the server cannot
honour are refused by name (see `unsupported`) rather than silently dropped.

Types are strict: a string where a number belongs is a 400, not a guess.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server import structured
from server.errors import InvalidRequest
from server.request import SamplingParams

MAX_CHOICES = 16  # `n`: each choice is its own row in the batch
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")

Float = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = list[StrictInt]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What chat and completions share: the model, sampling, stopping and streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0)] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    best_of: Any = None
    # Structured output (server/structured.py): OpenAI's response_format, or vLLM's structured_outputs.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's older spellings of structured_outputs: refused by name rather than silently ignored.
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    def unsupported(self) -> list[str]:
        """Fields that were set to something the server cannot do."""
        refused = [name for name in GUIDED if getattr(self, name) is not None]
        if self.logprobs not in (None, False):
            refused.append("logprobs")
        if self.top_logprobs not in (None, 0):
            refused.append("top_logprobs")
        if self.logit_bias:
            refused.append("logit_bias")
        if self.best_of not in (None, 1):
            refused.append("best_of")
        return refused

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
        }
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})

    def constraint(self) -> structured.Constraint | None:
        """The structured-output constraint asked for, validated; None for free text."""
        return structured.parse(response_format=self.response_format, structured_outputs=self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


ROLES = ("system", "developer", "user", "assistant")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        if self.functions:
            refused.append("functions")
        if self.function_call not in (None, "none"):
            refused.append("function_call")
        return refused

    def constraint(self) -> structured.Constraint | None:
        return structured.parse(
            response_format=self.response_format,
            structured_outputs=self.structured_outputs,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
        )

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them: known roles, plain string content."""
        if not self.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        result = []
        for index, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise InvalidRequest(
                    f"messages[{index}].role: unsupported role {message.role!r}; expected one of {', '.join(ROLES)}",
                    param=f"messages[{index}].role",
                )
            role = "system" if message.role == "developer" else message.role
            result.append({"role": role, "content": _text_of(message.content, index)})
        return result

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output budget and the name the client gave it (max_completion_tokens wins, as in OpenAI)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


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


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        if self.echo:
            refused.append("echo")
        if self.suffix:
            refused.append("suffix")
        return refused

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text to tokenize, or token ids as given."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]
