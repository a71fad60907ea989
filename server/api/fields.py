"""The building blocks of the request schemas: strict field types, the JSON Schema the document states for what
is checked elsewhere (`doc`), the limits only the loaded model knows (`LIMIT`), and the shapes of the structured
output and tool fields. Every API's schemas use them, so the document states each the same way.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from server import structured
from server.request import MAX_STOP_STRING_CHARS


def doc(**keywords: Any) -> Any:
    """JSON Schema keywords for the OpenAPI document alone: the check itself is done elsewhere."""
    return Field(json_schema_extra=keywords)


LIMIT = "x-tokenferry-limit"
# FastAPI's document model turns numeric bounds into floats, which cannot hold 2**64 - 1: such bounds travel
# under this key, and server/api/document.py puts them in place as exact integers.
EXACT = "x-tokenferry-exact"


class Limit(StrEnum):
    """Limits that depend on the loaded model; server/api/document.py fills them in where `LIMIT` marks them."""

    SERVED_MODEL = "served_model"  # the one model id (else 404)
    TOKEN_ID = "token_id"  # below the vocabulary size (the engine checks)
    PROMPT_IDS = "prompt_ids"  # at most context - 1 token ids


def _integral(value: Any) -> Any:
    """JSON does not tell 3 from 3.0, nor does the document's `integer`: an integral number is an integer.
    Strings, booleans and fractions stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Last in an Annotated list, so that the constraints before it still reach the document as JSON Schema.
INTEGRAL = BeforeValidator(_integral)
Float = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[StrictInt, doc(minimum=0, **{LIMIT: Limit.TOKEN_ID.value}), INTEGRAL]
TokenIds = list[TokenId]
StopText = Annotated[StrictStr, doc(minLength=1, maxLength=MAX_STOP_STRING_CHARS)]  # SamplingParams checks

# The shapes server/structured.py reads. What they hold (a JSON schema llguidance can enforce, a regex or a
# grammar that compiles, a tool_choice naming one of the tools) cannot be stated here: those are 400s naming the field.
_NAME = {"type": "string", "pattern": structured.FUNCTION_NAME.pattern}
_SPEC_TEXT = {"type": "string", "minLength": 1, "maxLength": structured.MAX_SPEC_CHARS}
RESPONSE_FORMAT = {
    "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {
            "type": "object",
            "properties": {"name": _NAME, "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}},
            "required": ["name", "schema"],
        },
    },
    "required": ["type"],
    # A schema goes with type json_schema alone (structured.parse refuses it beside the others).
    "if": {"properties": {"type": {"const": "json_schema"}}},
    "then": {"required": ["json_schema"]},
    "else": {"properties": {"json_schema": {"type": "null"}}},
}
STRUCTURED_OUTPUTS = {
    "properties": {
        "json": {"type": ["object", "string", "null"]},
        "regex": {"anyOf": [_SPEC_TEXT, {"type": "null"}]},
        "choice": {
            "anyOf": [
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": structured.MAX_CHOICE_STRINGS},
                {"type": "null"},
            ]
        },
        "grammar": {"anyOf": [_SPEC_TEXT, {"type": "null"}]},
    },
    "additionalProperties": False,
}
TOOL = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {"name": _NAME, "description": {"type": "string"}, "parameters": {"type": "object"}},
            "required": ["name"],
        },
    },
    "required": ["function"],
}
TOOL_CHOICE = [
    {"enum": ["none", "auto", "required", None]},
    {
        "type": "object",
        "properties": {"type": {"const": "function"}, "function": {"type": "object", "properties": {"name": _NAME}, "required": ["name"]}},
        "required": ["function"],
    },
]


class Strict(BaseModel):
    """A nested object of a request body: strict types, and unknown keys ignored as the APIs do."""

    model_config = ConfigDict(extra="ignore", strict=True)
