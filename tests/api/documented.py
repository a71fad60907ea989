"""Is an answer the one /openapi.json promises for its route? The error tests pass every error they provoke
through `assert_documented`, so a status, media type, body or header the document lacks fails the test
that provoked it.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema

from server.app import create_app
from server.config import Config

# The document as the application writes it; without a loaded model its limits stay open, and the
# statuses, media types and bodies are the same.
DOCUMENT: dict[str, Any] = create_app(Config(model="tiny")).openapi()


def operation_for(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """The documented operation that `method path` reaches, with its templated path; None for a route or a
    method the server does not have (its 404 or 405 belongs to no operation)."""
    for template, item in DOCUMENT["paths"].items():
        # Path parameters may hold slashes: `/v1/models/{model}` is served as `{model:path}`.
        parts = re.split(r"(\{[^}]+\})", template)
        pattern = "^" + "".join(".+" if part.startswith("{") else re.escape(part) for part in parts) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    return None


def documented_statuses(method: str, path: str) -> set[int]:
    found = operation_for(method, path)
    assert found is not None, f"{method} {path} is not in the document"
    return {int(status) for status in found[1]["responses"]}


def assert_documented(response: httpx.Response) -> None:
    found = operation_for(response.request.method, response.request.url.path)
    if found is None:
        return
    template, operation = found
    where = f"{response.request.method} {template} {response.status_code}"
    declared = operation["responses"].get(str(response.status_code))
    assert declared is not None, f"{where}: status not in the document ({sorted(operation['responses'])})"
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    content = declared.get("content", {})
    assert media_type in content, f"{where}: {media_type} not in the document ({sorted(content)})"
    for name, header in declared.get("headers", {}).items():
        assert not header.get("required") or name.lower() in response.headers, f"{where}: no {name} header"
    if media_type == "application/json":
        schema = {**content[media_type]["schema"], "components": DOCUMENT["components"]}
        jsonschema.validate(response.json(), schema)
