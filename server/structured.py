"""Structured output's fields: `response_format` and vLLM's `structured_outputs` -> one `Constraint`, a grammar
spec in canonical form (server/tools.py makes the tool calls' specs; server/grammars.py compiles them all).

`parse(...)` reads the request's fields (plain JSON values) into one `Constraint`, or None for free text. Every
bad input is an InvalidRequest naming its field; two constraints at once is one too. JSON whitespace is bounded
(`JSON_WHITESPACE`), so a model cannot loop on spaces until max_tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest, require

# Between two JSON tokens: nothing, one space, or a newline and an indentation of spaces or of tabs (as
# llama.cpp's JSON grammar allows). Room for compact and pretty-printed output, but a bound on every gap,
# so whitespace alone can never run to max_tokens, and no odd runs of blanks for a small model to wander into.
JSON_WHITESPACE = r"(?: |\n(?: {0,20}|\t{0,5}))?"
JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}
MAX_SPEC_CHARS = 64 * 1024  # a schema, regex, grammar or choice list larger than this is refused
MAX_CHOICE_STRINGS = 1024  # structured_outputs.choice
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# ---- what a request asks for ----


@dataclass(frozen=True)
class GrammarSpec:
    """One grammar in canonical form. `param` names the field it came from, for error messages."""

    kind: str  # "json_schema", "regex", "lark" or "choice"
    text: str  # canonical: schemas as sorted compact JSON; choices as a JSON list
    param: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()


@dataclass(frozen=True)
class Constraint:
    spec: GrammarSpec


def parse(response_format: Any = None, structured_outputs: Any = None, tools: bool = False) -> Constraint | None:
    """The request's one constraint, or None. Raises InvalidRequest naming the field at fault. `tools`: the
    request's tools constrain its answer (server/tools.py), so no other constraint may."""
    found: list[tuple[str, Constraint]] = []
    if (c := _response_format(response_format)) is not None:
        found.append(("response_format", c))
    if (c := _structured_outputs(structured_outputs)) is not None:
        found.append(("structured_outputs", c))
    if tools and found:
        raise InvalidRequest(f"only one constraint per request: got tools and {found[0][0]}", param="tools")
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise InvalidRequest(f"only one constraint per request: got {names}", param=found[1][0])
    return found[0][1] if found else None


def _response_format(value: Any) -> Constraint | None:
    if value is None:
        return None
    require(isinstance(value, dict), "response_format", "must be an object")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        require(value.get("json_schema") is None, "response_format.json_schema", "is given only with type 'json_schema'")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(_json_spec({"type": "object"}, "response_format"))
    if kind == "json_schema":
        param = "response_format.json_schema"
        spec = value.get("json_schema")
        require(isinstance(spec, dict), param, "must be an object with name and schema")
        name = spec.get("name")
        require(isinstance(name, str) and FUNCTION_NAME.match(name) is not None, f"{param}.name",
                 "must be 1 to 64 letters, digits, '_', '-' or '.'")  # fmt: skip
        require(spec.get("strict") is None or isinstance(spec.get("strict"), bool), f"{param}.strict", "must be a boolean")
        require("schema" in spec, f"{param}.schema", "is required")
        return Constraint(_json_spec(spec["schema"], f"{param}.schema"))
    raise InvalidRequest(
        f"response_format.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}", param="response_format.type"
    )


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


def _structured_outputs(value: Any) -> Constraint | None:
    if value is None:
        return None
    require(isinstance(value, dict), "structured_outputs", "must be an object")
    given = {k: v for k, v in value.items() if v is not None}
    unknown = sorted(set(given) - set(STRUCTURED_KINDS))
    if unknown:
        raise InvalidRequest(
            f"structured_outputs: unsupported key(s) {', '.join(unknown)}; use exactly one of {', '.join(STRUCTURED_KINDS)}",
            param=f"structured_outputs.{unknown[0]}",
        )
    if not given:
        return None
    if len(given) != 1:
        raise InvalidRequest(
            f"structured_outputs: give exactly one of {', '.join(STRUCTURED_KINDS)}, got {len(given)}",
            param="structured_outputs",
        )
    (kind, body), = given.items()
    param = f"structured_outputs.{kind}"
    if kind == "json":
        if isinstance(body, str):
            require(len(body) <= MAX_SPEC_CHARS, param, f"is longer than {MAX_SPEC_CHARS} characters")
            try:
                body = json.loads(body)
            except ValueError as exc:
                raise InvalidRequest(f"{param}: not valid JSON: {exc}", param=param) from None
        return Constraint(_json_spec(body, param))
    if kind == "regex":
        require(isinstance(body, str) and body != "", param, "must be a non-empty string")
        require(len(body) <= MAX_SPEC_CHARS, param, f"is longer than {MAX_SPEC_CHARS} characters")
        return Constraint(GrammarSpec("regex", body, param))
    if kind == "choice":
        require(isinstance(body, list) and body, param, "must be a non-empty list of strings")
        require(len(body) <= MAX_CHOICE_STRINGS, param, f"at most {MAX_CHOICE_STRINGS} choices")
        require(all(isinstance(c, str) and c for c in body), param, "every choice must be a non-empty string")
        text = json.dumps(body, ensure_ascii=False)
        require(len(text) <= MAX_SPEC_CHARS, param, f"is longer than {MAX_SPEC_CHARS} characters")
        return Constraint(GrammarSpec("choice", text, param))
    require(isinstance(body, str) and body.strip() != "", param, "must be a non-empty grammar (Lark or GBNF)")
    require(len(body) <= MAX_SPEC_CHARS, param, f"is longer than {MAX_SPEC_CHARS} characters")
    return Constraint(GrammarSpec("lark", body, param))


def _json_spec(schema: Any, param: str) -> GrammarSpec:
    require(isinstance(schema, dict), param, "must be a JSON schema object")
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise InvalidRequest(f"{param}: cannot be encoded as JSON: {exc}", param=param) from None
    require(len(text) <= MAX_SPEC_CHARS, param, f"is larger than {MAX_SPEC_CHARS} characters")
    return GrammarSpec("json_schema", text, param)
