"""OpenAI-compatible request bodies. Unknown fields are ignored, as OpenAI does; fields that OpenAI or vLLM
define and the server cannot honour are refused by name (see `unsupported`) rather than silently dropped.

Types are strict: a string where a number belongs is a 400, not a guess.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server.errors import InvalidRequest
from server.request import SamplingParams

MAX_CHOICES = 16  # `n`: each choice is its own row in the batch
MAX_BEST_OF = 20  # as OpenAI: candidates generated per prompt, each its own row
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI

# vLLM extra fields this server does not implement: sent with a value, they are a 400 naming them.
REFUSED_EXTRA_FIELDS = (
    "use_beam_search",
    "length_penalty",
    "early_stopping",
    "prompt_logprobs",
    "allowed_token_ids",
    "bad_words",
    "truncate_prompt_tokens",
    "logits_processors",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
)


def _is_neutral(value: Any) -> bool:
    """The values of those fields that mean "off" (None, false, empty, a length_penalty of 1) change nothing."""
    if value is None or value is False or value == [] or value == {}:
        return True
    return type(value) in (int, float) and value == 1

Float = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = list[StrictInt]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What chat and completions share: the model, sampling, stopping and streaming."""

    # Unknown fields are kept (and ignored) so that the ones vLLM defines can be refused by name.
    model_config = ConfigDict(extra="allow", strict=True)

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
    logit_bias: dict[str, Any] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_BEST_OF)] | None = None
    return_tokens_as_token_ids: StrictBool = False  # vLLM's: name tokens in scores "token_id:<id>"

    def unsupported(self) -> list[str]:
        """Fields that were set to something the server cannot do."""
        refused = ["logit_bias"] if self.logit_bias else []
        extra = self.model_extra or {}
        refused += [name for name in REFUSED_EXTRA_FIELDS if not _is_neutral(extra.get(name))]
        return refused

    def validate_choices(self) -> None:
        """`n` and `best_of` as OpenAI limits them: best_of >= n, and no streaming of candidates not yet ranked."""
        if self.best_of is None:
            return
        if self.best_of < self.n:
            raise InvalidRequest(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        if self.stream and self.best_of > self.n:
            raise InvalidRequest("best_of > n cannot be streamed: the best candidates are known only at the end", param="best_of")

    @property
    def candidates(self) -> int:
        """Rows generated per prompt: best_of when given, else n."""
        return self.best_of or self.n

    @property
    def output_logprobs(self) -> int | None:
        """Top entries per generated token the client asked for (None: no scores); each route spells it its way."""
        return None

    def sampling_params(self, max_tokens: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
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
            # Ranking best_of candidates needs each token's score, asked for or not.
            "logprobs": 0 if self.output_logprobs is None and self.best_of is not None else self.output_logprobs,
            "prompt_logprobs": prompt_logprobs,
        }
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})

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
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                refused.append(name)
        if self.tool_choice not in (None, "none"):
            refused.append("tool_choice")
        if self.function_call not in (None, "none"):
            refused.append("function_call")
        if self.response_format and self.response_format.get("type", "text") != "text":
            refused.append("response_format")
        if not _is_neutral((self.model_extra or {}).get("echo")):  # vLLM's chat echo (of the last message)
            refused.append("echo")
        return refused

    @property
    def output_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

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
    # 0 new tokens, with echo: the prompt alone, with its scores when logprobs is set (what evaluation harnesses ask).
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        if self.suffix:
            refused.append("suffix")
        return refused

    @property
    def output_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        """Echo with logprobs scores the prompt too; echo of no new tokens still runs the prompt, to check it."""
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens: must be at least 1 (0 only with echo)", param="max_tokens")
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            return self.logprobs or 0
        return None

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
