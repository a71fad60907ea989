"""Fuzzing the HTTP surface: schemathesis against /openapi.json, and the classic hand-written abuses.

Whatever arrives, the answer is never a 500, and every error has OpenAI's shape.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from bench.process import ServerProcess
from server.app import create_app
from server.config import Config

EXAMPLES_PER_ROUTE = 40
# The routes, read from the application itself (no model is loaded for that); invalid inputs only for
# the routes that take a body (any string is a valid model id in a path).
OPERATIONS = [
    (method.upper(), path, mode)
    for path, methods in create_app(Config(model="tiny")).openapi()["paths"].items()
    for method, spec in methods.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or spec.get("requestBody")
]


@pytest.fixture(scope="module")
def openapi(tiny_server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{tiny_server.url}/openapi.json")


def assert_openai_error(response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and "Traceback" not in body["error"]["message"]


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS])
def test_no_input_makes_a_500(openapi: schemathesis.BaseSchema, tiny_server: ServerProcess, method: str, path: str, mode: GenerationMode) -> None:
    operation = openapi[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=tiny_server.url, timeout=60)
        assert response.status_code < 500, f"{method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
        if response.status_code >= 400:
            assert_openai_error(response)

    check()


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000000000000000}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 1e400}', 400),
        (b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user"}]}', 200),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
        (b'{"model": "tiny", "messages": []}', 400),
        (b'{"model": "tiny", "messages": "hello"}', 400),
        (b'{"model": ["tiny"], "messages": []}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": "yes"}}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]' + b" " * 10, 400),
        (b"null", 400),
        (b'"a string"', 400),
        (b"{" * 5000 + b"}" * 5000, 400),
    ],
)
def test_hand_written_abuse(tiny_server: ServerProcess, raw: bytes, status: int) -> None:
    response = httpx.post(f"{tiny_server.url}{CHAT}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    if status >= 400:
        assert_openai_error(response)


def test_a_prompt_over_the_context_and_a_huge_body(tiny_server: ServerProcess) -> None:
    long = {"model": "tiny", "prompt": "word " * 5000, "max_tokens": 1}
    response = httpx.post(f"{tiny_server.url}/v1/completions", json=long, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    huge = json.dumps({"model": "tiny", "prompt": "x" * (5 * 1024 * 1024)}).encode()
    response = httpx.post(f"{tiny_server.url}/v1/completions", content=huge, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert_openai_error(response)


def test_a_lone_surrogate_in_a_completion_prompt_is_a_400(tiny_server: ServerProcess) -> None:
    raw = b'{"model": "tiny", "prompt": ["fine", "broken \\udc80 text"]}'
    response = httpx.post(f"{tiny_server.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
