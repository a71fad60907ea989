"""Every error becomes an HTTP answer here, in one place: OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, except on Anthropic's routes (/v1/messages...), which answer Anthropic's, {"type": "error", "error":
{"type", "message"}}, with its status codes (an engine not ready is 529 "overloaded_error" there).

Errors are raised where they are detected (schemas, prompt rendering, the engine); this module only maps
them to a status and a body. A 500 is logged with its request id and never carries a traceback.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from server import metrics
from server.errors import (
    ContextLengthExceeded,
    EngineUnavailable,
    GenerationFailed,
    InvalidRequest,
    QueueFull,
    TokenferryError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue drains in about a decode step; clients should come back soon
RETRY_AFTER_STATUSES = (429, 503, 529)


class NotFound(TokenferryError):
    """No such route."""

    code = "not_found"


class ModelNotFound(NotFound):
    """The model asked for is not the one this server serves."""

    code = "model_not_found"


class Unauthorized(TokenferryError):
    """The server runs with --api-key and the request lacks 'Authorization: Bearer <key>'."""

    code = "invalid_api_key"


class PayloadTooLarge(TokenferryError):
    """The request body is larger than --max-body-bytes."""

    code = "payload_too_large"


_STATUS: list[tuple[type[TokenferryError], int, str]] = [
    (ContextLengthExceeded, 400, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (Unauthorized, 401, "invalid_request_error"),
    (NotFound, 404, "invalid_request_error"),
    (PayloadTooLarge, 413, "invalid_request_error"),
    (QueueFull, 429, "rate_limit_error"),
    (EngineUnavailable, 503, "service_unavailable"),
    (GenerationFailed, 500, "internal_error"),
]


ANTHROPIC_PREFIX = "/v1/messages"
ANTHROPIC_STATUS = {503: 529}  # Anthropic's "overloaded": a client retries it, as it would a 503
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")  # in the document: exactly these four keys, as OpenAI sends
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body, which every error answer carries."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error body, which errors on /v1/messages carry."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["error"]
    error: AnthropicErrorDetail


RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "seconds to wait before retrying", "required": True, "schema": {"type": "integer", "minimum": 0}}
}


def documented(*errors: type[TokenferryError], anthropic: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can fail with `errors`, for the OpenAPI document: each status once,
    described by the errors that lead to it, with the API's body and the headers `error_response` adds.
    Derived from the same table as the answers themselves, so the two cannot disagree."""
    reasons: dict[int, list[str]] = {}
    for error in errors:
        status = next(status for cls, status, _ in _STATUS if issubclass(error, cls))
        status = ANTHROPIC_STATUS.get(status, status) if anthropic else status
        reasons.setdefault(status, []).append(_describe(error))
    responses: dict[int | str, dict[str, Any]] = {}
    for status, texts in sorted(reasons.items()):
        responses[status] = {"model": AnthropicErrorBody if anthropic else ErrorBody, "description": " ".join(texts)}
        if status in RETRY_AFTER_STATUSES:
            responses[status]["headers"] = RETRY_AFTER_HEADER
    return responses


def _describe(error: type[TokenferryError]) -> str:
    text = " ".join((error.__doc__ or error.__name__).split()).rstrip(".")
    return f"{text} (code `{error.code}`)." if error.code else f"{text}."


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


INTERNAL = error_body("internal server error", "internal_error")  # what a 500 says, whatever went wrong


def shaped(status: int, body: dict[str, Any], path: str) -> tuple[int, dict[str, Any]]:
    """An answer built in OpenAI's shape, in the shape (and status) of the API `path` belongs to."""
    if not is_anthropic(path):
        return status, body
    status = ANTHROPIC_STATUS.get(status, status)
    return status, {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": body["error"]["message"]}}


def status_and_body(exc: TokenferryError, path: str = "") -> tuple[int, dict[str, Any]]:
    status, body = next(
        ((status, error_body(exc.message, type_, exc.param, exc.code)) for cls, status, type_ in _STATUS if isinstance(exc, cls)),
        (500, INTERNAL),
    )
    return shaped(status, body, path)


def error_response(exc: TokenferryError, path: str = "") -> JSONResponse:
    """The answer to `exc` on a request for `path`, in that route's API's shape."""
    status, body = status_and_body(exc, path)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in RETRY_AFTER_STATUSES else None
    return JSONResponse(body, status_code=status, headers=headers)


def route_label(request: Request) -> str:
    """The metric label for a request: its route's path when one matched, so unknown paths stay one series."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def install(app: FastAPI) -> None:
    @app.exception_handler(TokenferryError)
    async def on_tokenferry_error(request: Request, exc: TokenferryError) -> JSONResponse:
        response = error_response(exc, request.url.path)
        metrics.REQUESTS.labels(route_label(request), "rejected" if response.status_code < 500 else "error").inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await on_tokenferry_error(request, _from_validation(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return await on_tokenferry_error(request, NotFound(f"no route {request.method} {request.url.path}"))
        metrics.REQUESTS.labels(route_label(request), "rejected").inc()
        status, body = shaped(exc.status_code, error_body(str(exc.detail), "invalid_request_error"), request.url.path)
        return JSONResponse(body, status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        metrics.REQUESTS.labels(route_label(request), "error").inc()
        status, body = shaped(500, INTERNAL, request.url.path)
        return JSONResponse(body, status_code=status)


def _from_validation(exc: RequestValidationError) -> InvalidRequest:
    """FastAPI's validation errors, reduced to the first problem and the field it concerns."""
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    path = _field_path(first.get("loc", ()))
    if not path:
        return InvalidRequest(f"the body must be a JSON object: {first['msg']}")
    return InvalidRequest(f"{path}: {first['msg']}", param=path)


def _field_path(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'. Union members add their type to the location
    (e.g. ('body', 'stop', 'list[str]', 0)); those tags are dropped, as no field name has brackets or dashes."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            continue
        else:
            path += f".{part}" if path else part
    return path


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
