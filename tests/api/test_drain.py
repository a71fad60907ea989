"""SIGTERM on the real process: /ready turns 503, newcomers get 503, requests in flight finish, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.process import ServerProcess

pytestmark = pytest.mark.slow


def stream_chat(url: str, max_tokens: int, started: threading.Event) -> list[dict]:
    """Every JSON payload of one streamed chat answer, [DONE] excluded."""
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    payloads = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line[6:]))
                if len(payloads) > 2:
                    started.set()
            elif line == "data: [DONE]":
                payloads.append({"done": True})
    return payloads


def wait_not_ready(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/ready never turned 503"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests_and_exits_0(server_logs: Path) -> None:
    server = ServerProcess("--log-level", "warning", log_dir=server_logs).wait_ready()
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stream_chat, server.url, 40, started)
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        wait_not_ready(server.url)
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        payloads = in_flight.result(timeout=120)
    assert payloads[-1] == {"done": True}
    assert payloads[-2]["choices"][0]["finish_reason"] == "length", "the request in flight ran to its end"
    assert server.process.wait(timeout=60) == 0
    server.terminate()


def test_a_drain_past_its_timeout_aborts_with_an_error_chunk(server_logs: Path) -> None:
    server = ServerProcess("--log-level", "warning", "--drain-timeout", "1", log_dir=server_logs).wait_ready()
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stream_chat, server.url, 2000, started)
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        payloads = in_flight.result(timeout=60)
    assert payloads[-1] == {"done": True}
    error = payloads[-2]["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert server.process.wait(timeout=60) == 0
    server.terminate()
