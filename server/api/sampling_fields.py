"""The sampling fields OpenAI's chat and completions bodies share (server/api/schemas.py), how they become
the engine's SamplingParams, and the fields refused by name. Unknown fields are ignored, as OpenAI does;
types are strict; `doc(...)` states in the document the checks made elsewhere (see schemas.py)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from server import features, structured
from server.grammars import Grammar
from server.api.fields import (
    EXACT,
    INTEGRAL,
    LIMIT,
    RESPONSE_FORMAT,
    STRUCTURED_OUTPUTS,
    Float,
    Limit,
    StopText,
    TokenIds,
    doc,
)
from server.errors import InvalidRequest
from server.request import MAX_STOP_STRINGS, SEED_RANGE, SamplingParams

MAX_N = 16  # `n`: each choice is its own row in the batch
MAX_BEST_OF = 20  # as OpenAI: candidates generated per prompt, each its own row
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI

# vLLM extra fields this server does not implement: sent with a value, they are a 400 naming them.
REFUSED_EXTRA_FIELDS = (
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


def is_neutral(value: Any) -> bool:
    """Those fields pass only as null or false, which ask for nothing (the document says the same)."""
    return value is None or value is False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """What chat and completions share: the model, sampling, stopping and streaming."""

    # Unknown fields are kept (and ignored) so that the ones vLLM defines can be refused by name; the document
    # names those too, with the only values that pass.
    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra=lambda schema, cls: cls.document(schema),
    )
    # A JSON Schema `if`/`then` per rule that ties one field to another (the checks themselves are in the code).
    rules: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def document(cls, schema: dict[str, Any]) -> None:
        schema["properties"].update(
            {name: {"enum": [None, False], "description": "not implemented: other values are a 400"} for name in REFUSED_EXTRA_FIELDS}
        )
        if cls.rules:
            schema["allOf"] = cls.rules

    model: Annotated[StrictStr, doc(**{LIMIT: Limit.SERVED_MODEL.value})] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1), INTEGRAL] | None = None
    temperature: Annotated[Float, Field(ge=0)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1), INTEGRAL] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0)] | None = None
    seed: Annotated[StrictInt, doc(**{EXACT: {"minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]}}), INTEGRAL] | None = None
    stop: StopText | Annotated[list[StopText], doc(maxItems=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0, description="at most max_tokens"), INTEGRAL] = 0
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N), INTEGRAL] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_BEST_OF, description="at least n"), INTEGRAL] | None = None
    return_tokens_as_token_ids: StrictBool = False  # vLLM's: name tokens in scores "token_id:<id>"
    # vLLM's beam search fields, meaning what transformers' generate(num_beams=...) means by them.
    use_beam_search: Annotated[
        StrictBool,
        Field(
            description="beam search of width best_of (else n), returning the n best finished sequences, best first; "
            "temperature must be 0 or absent, and it cannot be streamed"
        ),
    ] = False
    length_penalty: Annotated[
        Float,
        Field(description="with use_beam_search: a sequence's score is its logprob sum / its length ** length_penalty"),
    ] = 1.0
    early_stopping: Annotated[
        StrictBool | Literal["never"],
        Field(description='with use_beam_search: when the search ends (true, false or "never", as in transformers)'),
    ] = False
    # Fields the server cannot honour: the document admits only the values `unsupported` lets through.
    logit_bias: Annotated[dict[str, Any] | None, doc(maxProperties=0)] = None
    # Structured output (server/structured.py): OpenAI's response_format, or vLLM's structured_outputs.
    response_format: Annotated[dict[str, Any] | None, doc(**RESPONSE_FORMAT)] = None
    structured_outputs: Annotated[dict[str, Any] | None, doc(**STRUCTURED_OUTPUTS)] = None

    def unsupported(self) -> list[str]:
        """Fields that were set to something the server cannot do."""
        refused = ["logit_bias"] if self.logit_bias else []
        extra = self.model_extra or {}
        refused += [name for name in REFUSED_EXTRA_FIELDS if not is_neutral(extra.get(name))]
        return refused

    def check_relations(self) -> None:
        """Limits that tie two fields together (JSON Schema states one field at a time); each route adds its own.
        Here `n` and `best_of` as OpenAI limits them: best_of >= n, and no streaming of candidates not yet ranked."""
        if self.use_beam_search and self.stream:
            raise InvalidRequest("use_beam_search cannot be streamed: the best beams are known only at the end", param="stream")
        # The search itself runs at temperature 0 (`sampling_params`), so a client's other value is refused here.
        if self.use_beam_search and self.temperature is not None and not features.RULES["temperature"].allows("beam", self.temperature):
            raise InvalidRequest("temperature must be 0 (or absent) with use_beam_search", param="temperature")
        if self.best_of is None:
            return
        if self.best_of < self.n:
            raise InvalidRequest(f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        if self.stream and self.best_of > self.n:
            raise InvalidRequest("best_of > n cannot be streamed: the best candidates are known only at the end", param="best_of")

    @property
    def candidates(self) -> int:
        """Engine requests per prompt: best_of when given, else n (one beam search returns all its n)."""
        return 1 if self.use_beam_search else self.best_of or self.n

    @property
    def output_logprobs(self) -> int | None:
        """Top entries per generated token the client asked for (None: no scores); each route spells it its way."""
        return None

    def sampling_params(
        self, max_tokens: int | None, prompt_logprobs: int | None = None, grammar: Grammar | None = None
    ) -> SamplingParams:
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
            # Ranking best_of candidates needs each token's score, asked for or not (a beam search ranks its own).
            "logprobs": 0
            if self.output_logprobs is None and self.best_of is not None and not self.use_beam_search
            else self.output_logprobs,
            "prompt_logprobs": prompt_logprobs,
            "grammar": grammar,
        }
        if self.use_beam_search:
            values |= {
                "temperature": 0.0,
                "beam_width": self.best_of or self.n,
                "beam_returns": self.n,
                "length_penalty": self.length_penalty,
                "early_stopping": self.early_stopping,
            }
        return SamplingParams.given(**values)

    def constraint(self) -> structured.Constraint | None:
        """The structured-output constraint asked for, validated; None for free text."""
        return structured.parse(response_format=self.response_format, structured_outputs=self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def requires(field: str, condition: dict[str, Any], other: str, value: Any) -> dict[str, Any]:
    """JSON Schema for "when `field` meets `condition`, `other` must be `value`"."""
    return {
        "if": {"properties": {field: condition}, "required": [field]},
        "then": {"properties": {other: {"const": value}}, "required": [other]},
    }


# What a beam search admits, for the document: server/features.py decides; a beam cannot be streamed.
_BEAM_FIELDS = [name for name in features.RULES if features.beam_enum(name) and name in SamplingFields.model_fields]
BEAM_RULE = {
    "if": {"properties": {"use_beam_search": {"const": True}}, "required": ["use_beam_search"]},
    "then": {"properties": {"stream": {"const": False}, **{name: {"enum": features.beam_enum(name)} for name in _BEAM_FIELDS}}},
}
