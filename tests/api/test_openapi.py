"""/openapi.json tells the truth: the statuses each route really answers with their bodies, no 422, the
media types, the constraints on request fields, the loaded model's limits, and no /docs page that needs a CDN.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest

from bench.process import ServerProcess
from server.app import create_app
from server.config import Config
from tests.api.documented import DOCUMENT, assert_documented, documented_statuses

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Every status the error tests provoke, by route, and where (tests/api/...). Each of those tests also passes
# its answers through `assert_documented`; this table is the summary that fails first if a route loses one.
PROVOKED = {
    ("POST", CHAT): {
        200: "everywhere",
        400: "test_errors: invalid fields, bodies that are not JSON objects, context_length_exceeded; test_fuzz",
        404: "test_errors: unknown model",
        413: "test_errors: a body over --max-body-bytes",
        429: "test_abuse: overload",
        500: "test_errors, test_abuse: a failure inside the engine",
        503: "test_errors: while loading; test_abuse: the engine thread died",
    },
    ("POST", COMPLETIONS): {
        200: "everywhere",
        400: "test_fuzz: context_length_exceeded, lone surrogate",
        413: "test_fuzz: a 5 MB prompt",
        429: "test_errors: a full queue",
        503: "test_drain: while draining",
    },
    ("GET", "/v1/models"): {200: "test_errors", 401: "test_errors: auth on"},
    ("GET", "/v1/models/gpt-9"): {200: "test_openai_client: models.retrieve", 404: "test_errors: unknown model"},
    ("GET", "/health"): {200: "test_errors", 503: "test_abuse: the engine thread died"},
    ("GET", "/ready"): {200: "test_errors", 503: "test_errors: while loading; test_drain"},
    ("GET", "/metrics"): {200: "test_metrics, test_errors"},
}


@pytest.mark.parametrize(("method", "path"), list(PROVOKED), ids=[f"{m} {p}" for m, p in PROVOKED])
def test_every_status_the_error_tests_provoke_is_documented_for_its_route(method: str, path: str) -> None:
    assert set(PROVOKED[method, path]) <= documented_statuses(method, path)


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in DOCUMENT["paths"].items() for method, op in item.items()]


def test_errors_have_their_apis_body_and_never_422() -> None:
    assert "422" not in json.dumps(DOCUMENT["paths"])
    assert "HTTPValidationError" not in DOCUMENT["components"]["schemas"]
    for method, path, operation in operations():
        for status, response in operation["responses"].items():
            if int(status) < 400 or path in ("/health", "/ready"):  # probes answer their own 503 body
                continue
            schema = response["content"]["application/json"]["schema"]
            body = "AnthropicErrorBody" if path.startswith("/v1/messages") else "ErrorBody"  # Anthropic's routes, its shape
            assert schema == {"$ref": f"#/components/schemas/{body}"}, (method, path, status)
            assert body == "ErrorBody" or status != "503", (method, path)  # Anthropic's clients know 529
            if status in ("429", "503", "529"):
                assert response["headers"]["Retry-After"]["required"], (method, path, status)
        assert "413" in operation["responses"], (method, path)  # the body limit is in front of every route
    error = DOCUMENT["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"} and error["additionalProperties"] is False


def test_media_types() -> None:
    paths = DOCUMENT["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for path, body in ((CHAT, "ChatCompletion"), (COMPLETIONS, "Completion")):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}


def request_schema(path: str) -> dict[str, Any]:
    ref = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return {"$ref": ref, "components": DOCUMENT["components"]}


def is_valid(body: dict[str, Any], path: str) -> bool:
    return jsonschema.Draft202012Validator(request_schema(path)).is_valid(body)


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
        (CHAT, {"messages": MESSAGES, "stop": ""}, "stop"),
        (CHAT, {"messages": MESSAGES, "stop": ["x"] * 17}, "stop"),
        (CHAT, {"messages": MESSAGES, "seed": 2**64}, "seed"),
        (CHAT, {"messages": MESSAGES, "logprobs": 1}, "logprobs"),
        (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"messages": MESSAGES, "use_beam_search": True, "stream": True}, "stream"),
        (COMPLETIONS, {"prompt": "hi", "use_beam_search": True, "temperature": 0.5}, "temperature"),
        (CHAT, {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0].function"),
        (CHAT, {"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
        (CHAT, {"messages": MESSAGES, "tool_choice": "sometimes"}, "tool_choice"),
        (COMPLETIONS, {"prompt": "hi", "structured_outputs": {"yaml": "a: 1"}}, "structured_outputs.yaml"),
        (COMPLETIONS, {"prompt": "hi", "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        (COMPLETIONS, {"prompt": ""}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [""]}, "prompt"),
        (COMPLETIONS, {"prompt": [[]]}, "prompt"),
        (COMPLETIONS, {"prompt": [-1]}, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "echo": "yes"}, "echo"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 6}, "logprobs"),
        (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_what_the_document_rejects_the_server_refuses(tiny_server: ServerProcess, path: str, body: dict, param: str) -> None:
    assert not is_valid(body, path)
    response = httpx.post(f"{tiny_server.url}{path}", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert_documented(response)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"messages": [{"role": "developer"}], "max_tokens": 1, "seed": 2**64 - 1, "stop": ["a"] * 16}),
        (CHAT, {"messages": MESSAGES, "max_tokens": 1.0, "n": 2.0, "logprobs": False, "response_format": {"type": "text"}}),
        (COMPLETIONS, {"prompt": [[1, 2], [3]], "max_tokens": 1, "stop_token_ids": [0], "seed": -(2**63)}),
        (COMPLETIONS, {"prompt": ["a", "b"], "max_tokens": 1, "echo": False, "suffix": "", "best_of": 1}),
        (COMPLETIONS, {"prompt": [1, 2], "max_tokens": 0, "echo": True, "logprobs": 2}),
        (CHAT, {"messages": MESSAGES, "max_tokens": 2, "logprobs": True, "top_logprobs": 3, "n": 2, "best_of": 3}),
    ],
)
def test_what_the_document_admits_the_server_serves(tiny_server: ServerProcess, path: str, body: dict) -> None:
    assert is_valid(body, path)
    response = httpx.post(f"{tiny_server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_the_loaded_model_s_limits_are_filled_in(tiny_server: ServerProcess) -> None:
    document = httpx.get(f"{tiny_server.url}/openapi.json", timeout=30).json()
    assert "x-tokenferry" not in json.dumps(document)
    schemas = document["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["tiny"]
    ids = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]
    assert ids["maxItems"] == 1023 and ids["items"]["maximum"] == 511  # the tiny model: context 1024, 512 tokens
    seed = schemas["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**64 - 1)
    model = document["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["schema"]
    assert model["enum"] == ["tiny"]
    assert "securitySchemes" not in document["components"]  # no --api-key here


def test_with_an_api_key_the_api_routes_want_the_bearer_or_the_x_api_key() -> None:
    document = create_app(Config(model="tiny", api_key="secret")).openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schemes["api_key"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    for method, path, operation in [(m, p, op) for p, item in document["paths"].items() for m, op in item.items()]:
        guarded = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        assert ("security" in operation) == guarded, (method, path)


def test_docs_pages_are_off_and_the_document_is_served() -> None:
    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=create_app(Config(model="tiny")))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get(path)).status_code for path in ("/docs", "/redoc", "/openapi.json")]

    assert asyncio.run(main()) == [404, 404, 200]
