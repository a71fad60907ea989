"""Errors raised where they are detected; server/api/errors.py turns them into HTTP answers, in one place."""

from __future__ import annotations


class TokenferryError(Exception):
    """Base of the errors a client can be told about."""

    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(TokenferryError):
    """A parameter or prompt the server cannot accept; `param` names the field."""


def require(ok: bool, param: str, message: str) -> None:
    """Raise InvalidRequest "`param`: `message`" unless `ok`."""
    if not ok:
        raise InvalidRequest(f"{param}: {message}", param=param)


class ContextLengthExceeded(InvalidRequest):
    """The prompt and max_tokens do not fit in the model's context."""

    code = "context_length_exceeded"


class QueueFull(TokenferryError):
    """The waiting queue is at its budget; the client should retry later."""

    code = "queue_full"


class EngineUnavailable(TokenferryError):
    """The engine is not accepting requests: loading, draining or stopped."""

    code = "unavailable"


class GenerationFailed(TokenferryError):
    """A request failed inside the engine loop; the message never carries a traceback."""

    code = "generation_failed"
