"""Shared fixtures: the tiny model (fast, random weights), the real default model (SmolLM2-135M), and real
servers on loopback running either."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models import LoadedModel, load
from bench.process import ServerProcess

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load("tiny")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    return load("default")


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def tiny_server(server_logs: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--model", "tiny", "--log-level", "warning", log_dir=server_logs).wait_ready()
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def smol_server(server_logs: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--log-level", "warning", log_dir=server_logs).wait_ready()
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def locked_server(server_logs: Path) -> Iterator[ServerProcess]:
    """Auth, CORS, a small body limit and a tiny queue, all on."""
    server = ServerProcess(
        "--model", "tiny", "--log-level", "warning", "--api-key", API_KEY,
        "--cors-origins", "https://chat.example.com", "--max-body-bytes", "4096",
        "--max-waiting", "2", "--max-batch-size", "1",
        log_dir=server_logs,
    ).wait_ready()  # fmt: skip
    yield server
    server.terminate()
