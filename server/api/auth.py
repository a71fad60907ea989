"""The API key: with --api-key set, the API routes want it as `Authorization: Bearer <key>` (OpenAI's clients)
or `x-api-key: <key>` (Anthropic's), compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.errors import Unauthorized
from server.api.state import state_of

API_KEY_HEADER = "x-api-key"


async def require_api_key(request: Request) -> None:
    key = state_of(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else request.headers.get(API_KEY_HEADER, "")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
