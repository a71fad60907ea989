"""Every error status with OpenAI's body shape; auth on and off; CORS; loading; failures after the 200."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from models import LoadedModel
from models.forward import Forward
from server.api.state import AppState
from server.app import create_app
from server.config import Config
from server.engine import Engine
from tests.api.documented import assert_documented
from tests.conftest import API_KEY
from tests.helpers import around_forward
from bench.process import ServerProcess

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert_documented(response)  # the status, its body and its headers, as /openapi.json says for the route
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": "10"}, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"model": "tiny", "messages": MESSAGES, "n": 100}, "n"),
        ({"model": "tiny", "messages": MESSAGES, "stop": 5}, "stop"),
        ({"model": "tiny", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": "tiny", "messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
        ({"model": "tiny", "messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "tiny", "messages": MESSAGES, "logprobs": 1}, "logprobs"),
        ({"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "tiny", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "tiny", "messages": MESSAGES, "use_beam_search": True, "stream": True}, "stream"),
        ({"model": "tiny", "messages": MESSAGES, "use_beam_search": True, "temperature": 0.5}, "temperature"),
        ({"model": "tiny", "messages": MESSAGES, "use_beam_search": True, "early_stopping": "always"}, "early_stopping"),
        ({"model": "tiny", "messages": MESSAGES, "echo": True}, "echo"),
        ({"model": "tiny", "messages": MESSAGES, "n": 3, "best_of": 2}, "best_of"),
        ({"model": "tiny", "messages": MESSAGES, "best_of": 21}, "best_of"),
        ({"model": "tiny", "messages": MESSAGES, "best_of": 2, "stream": True}, "best_of"),
        ({"model": "tiny", "messages": MESSAGES, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ],
)
def test_invalid_requests_are_400_naming_the_field(tiny_server: ServerProcess, body: dict, param: str) -> None:
    response = httpx.post(f"{tiny_server.url}{CHAT}", json=body, timeout=30)
    error = assert_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "logprobs": True}, "logprobs"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "echo": "yes"}, "echo"),
        ({"prompt": "hi", "n": 4, "best_of": 3}, "best_of"),
        ({"prompt": "hi", "n": 1, "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": "hi", "best_of": 0}, "best_of"),
        ({"prompt": "hi", "use_beam_search": True, "best_of": 2, "stream": True}, "stream"),
        ({"prompt": "hi", "use_beam_search": True, "n": 2, "best_of": 1}, "best_of"),
        ({"prompt": "hi", "use_beam_search": True, "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "hi", "use_beam_search": True, "structured_outputs": {"choice": ["a", "b"]}}, "use_beam_search"),
        ({"prompt": "hi", "length_penalty": "long"}, "length_penalty"),
        ({"prompt": "hi", "suffix": "!"}, "suffix"),
    ],
)
def test_invalid_completions_are_400_naming_the_field(tiny_server: ServerProcess, body: dict, param: str) -> None:
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert_error(response, 400, param=param)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe{}", b""])
def test_bodies_that_are_not_a_json_object_are_400(tiny_server: ServerProcess, content: bytes) -> None:
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(f"{tiny_server.url}{CHAT}", content=content, headers=headers, timeout=30), 400)


def test_a_prompt_over_the_context_is_400_context_length_exceeded(tiny_server: ServerProcess) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "many words " * 1000}]}
    assert_error(httpx.post(f"{tiny_server.url}{CHAT}", json=body, timeout=30), 400, param="messages", code="context_length_exceeded")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 100_000}
    assert_error(httpx.post(f"{tiny_server.url}{CHAT}", json=body, timeout=30), 400, param="max_tokens", code="context_length_exceeded")


def test_unknown_model_and_unknown_route_are_404(tiny_server: ServerProcess) -> None:
    response = httpx.post(f"{tiny_server.url}{CHAT}", json={"model": "gpt-9", "messages": MESSAGES}, timeout=30)
    assert_error(response, 404, param="model", code="model_not_found")
    assert_error(httpx.get(f"{tiny_server.url}/v1/nothing-here", timeout=30), 404, code="not_found")
    assert_error(httpx.get(f"{tiny_server.url}/v1/models/gpt-9", timeout=30), 404, code="model_not_found")
    assert_error(httpx.post(f"{tiny_server.url}/health", timeout=30), 405)


def test_auth_on_wants_the_bearer_key(locked_server: ServerProcess) -> None:
    url = f"{locked_server.url}/v1/models"
    assert_error(httpx.get(url, timeout=30), 401, code="invalid_api_key")
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
    assert_error(httpx.get(url, headers={"Authorization": API_KEY}, timeout=30), 401)
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).status_code == 200
    for open_route in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{locked_server.url}{open_route}", timeout=30).status_code == 200


def test_auth_off_takes_any_or_no_key(tiny_server: ServerProcess) -> None:
    assert httpx.get(f"{tiny_server.url}/v1/models", timeout=30).status_code == 200
    assert httpx.get(f"{tiny_server.url}/v1/models", headers={"Authorization": "Bearer x"}, timeout=30).status_code == 200


def test_a_body_over_the_limit_is_413(locked_server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(httpx.post(f"{locked_server.url}{CHAT}", json=body, headers=headers, timeout=30), 413)

    def chunks():
        yield json.dumps(body).encode()[:3000]
        yield b" " * 3000

    chunked = httpx.post(f"{locked_server.url}{CHAT}", content=chunks(), headers={**headers, "content-type": "application/json"}, timeout=30)
    assert_error(chunked, 413)


def test_a_full_queue_is_429_with_retry_after(locked_server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": "go", "max_tokens": 300, "ignore_eos": True}

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{locked_server.url}/v1/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(8) as pool:  # one runs, two wait, the rest are refused
        responses = list(pool.map(send, range(8)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in responses)
    assert all(r.headers["retry-after"].isdigit() for r in refused)
    assert_error(refused[0], 429, code="queue_full")
    assert httpx.get(f"{locked_server.url}/ready", timeout=30).status_code == 200


def test_cors_preflight_only_for_configured_origins(locked_server: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{locked_server.url}{CHAT}", headers={**preflight, "Origin": "https://chat.example.com"}, timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://chat.example.com"
    refused = httpx.options(f"{locked_server.url}{CHAT}", headers={**preflight, "Origin": "https://evil.example.org"}, timeout=30)
    assert "access-control-allow-origin" not in refused.headers


def in_process(config: Config, engine: Engine | None = None) -> tuple[httpx.AsyncClient, AppState]:
    app = create_app(config, engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app.state.tokenferry


def test_while_loading_health_is_200_ready_and_requests_are_503() -> None:
    async def main() -> None:
        client, _ = in_process(Config(model="tiny"))  # no lifespan here: the model never finishes loading
        async with client:
            assert (await client.get("/health")).json() == {"status": "loading"}
            assert (await client.get("/ready")).status_code == 503
            response = await client.post(CHAT, json={"model": "tiny", "messages": MESSAGES})
            assert_error(response, 503)
            assert response.headers["retry-after"]

    asyncio.run(main())


def test_a_failure_inside_the_engine_is_500_without_traceback_or_an_error_chunk(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(inputs: Forward, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        raise RuntimeError("secret internals: /home/user/model.py line 42")

    around_forward(monkeypatch, broken)

    async def main() -> None:
        config = Config(model="tiny")
        engine = Engine(tiny, config.budgets)
        engine.start()
        client, _ = in_process(config, engine)
        async with client:
            response = await client.post(CHAT, json={"model": "tiny", "messages": MESSAGES})
            error = assert_error(response, 500)
            assert "secret" not in error["message"]
            streamed = await client.post(CHAT, json={"model": "tiny", "messages": MESSAGES, "stream": True})
            assert streamed.status_code == 200
            payloads = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert payloads[-1] == "[DONE]"
            chunk_error = json.loads(payloads[-2])["error"]
            assert set(chunk_error) == {"message", "type", "param", "code"} and "secret" not in chunk_error["message"]
            assert (await client.get("/health")).status_code == 200, "the loop lives on"
        await engine.shutdown(drain=False)

    asyncio.run(main())
