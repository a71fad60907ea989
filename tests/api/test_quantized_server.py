"""A server started with --quantization says so in its load log and in /v1/models, and answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.process import ServerProcess


@pytest.fixture(scope="module")
def int8_server(server_logs: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--model", "tiny", "--quantization", "int8", log_dir=server_logs).wait_ready()
    yield server
    server.terminate()


def test_the_mode_is_in_the_load_log_and_the_model_card(int8_server: ServerProcess, tiny_server: ServerProcess) -> None:
    card = httpx.get(f"{int8_server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["quantization"] == "int8"
    assert httpx.get(f"{tiny_server.url}/v1/models/tiny", timeout=30).json()["quantization"] == "none"
    logs = int8_server.logs()
    assert '"quantized"' in logs and '"quantization": "int8"' in logs, logs[-2000:]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    answer = httpx.post(f"{int8_server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
