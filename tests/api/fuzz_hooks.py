"""schemathesis hooks for the fuzz test (loaded through SCHEMATHESIS_HOOKS by tests/api/test_fuzz.py).

Two, each as narrow as it can be:
- a cost cap: a generation request asks for at most MAX_NEW_TOKENS tokens. Without it every schema-valid
  body without `max_tokens` runs to the end of the tiny model's context (1024 tokens, times `n`, times the
  prompts): minutes per route on a 2-core machine, and past the 10 s of the `max_response_time` check.
  Only numbers above the cap are lowered, and an absent one is set, so no invalid body turns valid and no
  valid one invalid;
- the limits JSON Schema cannot state, as they compare two values (documented on the 400 response and on the
  fields): a prompt and `max_tokens` over the model's context (code `context_length_exceeded`), and
  `min_tokens` over `max_tokens`, `best_of` under `n` (or over it while streaming), beam search with
  structured output (the document states beam search's other rules); and what a
  structured-output field holds, which the document gives only the shape of: a JSON schema the grammar
  backend cannot enforce, a regex or grammar that does not compile, a tool_choice naming no tool, two
  constraints at once; and what a conversation holds across its messages: a tool result that answers no
  earlier call, a call sent back whose arguments are not JSON text of an object, a block in the wrong
  role's message, a conversation that ends on the assistant (Anthropic's prefill). A schema-valid body refused with a 400 for exactly those reasons is not a failure of
  `positive_data_acceptance`; any other refusal of a schema-valid body still is.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

MAX_NEW_TOKENS = 8
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "tools", "tool_choice", "output_config", "text")
# What a conversation holds across its messages, which JSON Schema states one item at a time.
CONVERSATION_RULES = ("answers no earlier", "must be a JSON object", "belong in", "must end with a user message")


@schemathesis.hook
def before_call(context: Any, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    if case.operation.path not in GENERATION_PATHS or not isinstance(case.body, dict):
        return
    for field in TOKEN_FIELDS:
        value = case.body.get(field)
        if _integral(value) and value > MAX_NEW_TOKENS:
            case.body[field] = MAX_NEW_TOKENS
    if all(case.body.get(field) is None for field in TOKEN_FIELDS):
        case.body["max_output_tokens" if case.operation.path == "/v1/responses" else "max_tokens"] = MAX_NEW_TOKENS


def _integral(value: Any) -> bool:
    """An integer as JSON Schema sees one (3.0 is one); 3.5, booleans and infinities are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def beyond_json_schema(response: Any) -> bool:
    """A 400 for a limit that compares two fields."""
    if response.status_code != 400:
        return False
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return False
    # Anthropic's errors carry no param or code: the message starts with the field it names.
    param = error.get("param") or message.partition(": ")[0]
    return (
        error.get("code") == "context_length_exceeded"
        or "context is" in message
        or param in ("min_tokens", "best_of", "use_beam_search")
        or param.split(".")[0].split("[")[0] in STRUCTURED_FIELDS
        or any(rule in message for rule in CONVERSATION_RULES)
    )


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: schemathesis.Case, response: Any) -> bool:
    return not (isinstance(failure, RejectedPositiveData) and beyond_json_schema(response))
