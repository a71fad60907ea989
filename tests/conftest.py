"""Shared fixtures: the tiny model (fast, random weights), the real default model (SmolLM2-135M), and real
servers on loopback running either."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.process import ServerProcess
from models import LoadedModel, kv_cache, load

API_KEY = "test-key-123"


@pytest.fixture(autouse=True)
def kv_stores_start_as_nan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every KV store an in-process test allocates is NaN until written: a column that entered a live
    window without being written or cleared would turn the outputs to NaN and fail the test.

    Not for the real model's tests: filling their stores (up to gigabytes of headroom and spare rows) cost
    about a minute of page faults in CI, and the tiny model's tests already walk every path that writes a store."""
    if request.node.get_closest_marker("slow"):
        return

    def poisoned(size: tuple[int, ...], shape: kv_cache.CacheShape) -> torch.Tensor:
        return torch.full(size, float("nan"), dtype=shape.dtype, device=shape.device)

    monkeypatch.setattr(kv_cache, "allocate", poisoned)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    # float32 wherever `auto` would choose: the references these fixtures are compared with are float32.
    return load("tiny", dtype="float32")


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    return load("default", dtype="float32")


@pytest.fixture(scope="session")
def smol_transformers() -> LoadedModel:
    """The default model as transformers builds it (its own modules: projections apart, float Linears unpacked),
    for `generate` and transformers' forward: the independent reference the served model is checked against."""
    return load("default", fuse=False)


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
    """The default model in float32, the dtype of the references its answers are checked against."""
    server = ServerProcess("--log-level", "warning", "--dtype", "float32", log_dir=server_logs).wait_ready()
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
