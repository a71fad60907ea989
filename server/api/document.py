"""The OpenAPI document at /openapi.json, made exact for this server.

FastAPI writes it from the routes and the schemas; this adds what only the running server knows and drops
what it never sends:
- no 422: validation errors are 400s with OpenAI's body (server/api/errors.py), declared on each route;
- once the model is loaded, its limits (`LIMIT` in the schemas marks where): the served model's id, token
  ids below the vocabulary size, at most context - 1 prompt token ids. While it loads they
  stay open, as every /v1 route answers 503 then anyway;
- numeric bounds that a float cannot hold, as exact integers (`EXACT` in the schemas);
- with --api-key, the bearer scheme on the /v1 routes.
The document is rebuilt from FastAPI's cached one on each request (it is small and rarely asked for), so it
follows the model's loading.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from server.api.auth import API_KEY_HEADER
from server.api.fields import EXACT, LIMIT, Limit
from server.api.state import AppState

_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
BEARER = "bearer"
API_KEY = "api_key"
PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # the routes server/api/auth.py guards


def install(app: FastAPI) -> None:
    generated = app.openapi  # FastAPI's own, which caches what it writes

    def openapi() -> dict[str, Any]:
        document = copy.deepcopy(generated())
        state: AppState = app.state.tokenferry
        _drop_validation_errors(document)
        _put_exact_bounds(document)
        if state.engine is not None:
            info = state.engine.info
            limits = {
                Limit.SERVED_MODEL: {"enum": [state.model_name]},
                Limit.TOKEN_ID: {"maximum": info.vocab_size - 1},
                Limit.PROMPT_IDS: {"maxItems": info.context_length - 1},
            }
            _fill_limits(document, limits)
        if state.config.api_key is not None:
            _require_bearer(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, operation) for path, item in document.get("paths", {}).items() for operation in item.values()]


def _drop_validation_errors(document: dict[str, Any]) -> None:
    for _, operation in _operations(document):
        operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        schemas.pop(name, None)


def _put_exact_bounds(node: Any) -> None:
    if isinstance(node, dict):
        node.update(node.pop(EXACT, {}))
        for value in node.values():
            _put_exact_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _put_exact_bounds(value)


def _fill_limits(node: Any, limits: dict[Limit, dict[str, Any]]) -> None:
    if isinstance(node, dict):
        if LIMIT in node:
            node.update(limits[Limit(node.pop(LIMIT))])
        for value in node.values():
            _fill_limits(value, limits)
    elif isinstance(node, list):
        for value in node:
            _fill_limits(value, limits)


def _require_bearer(document: dict[str, Any]) -> None:
    """Either scheme will do (server/api/auth.py): the bearer token, or Anthropic's x-api-key header."""
    schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER] = {"type": "http", "scheme": "bearer"}
    schemes[API_KEY] = {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
    for path, operation in _operations(document):
        if path.startswith(PROTECTED):
            operation["security"] = [{BEARER: []}, {API_KEY: []}]
