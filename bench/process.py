"""A real tokenferry server in a subprocess, on a free loopback port: for the benchmarks and the tests."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 180
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric_total(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def request_outcomes(metrics_text: str, route: str | None = None) -> Counter:
    """tokenferry_requests_total by outcome, for one route or, by default, every /v1 route."""
    counts: Counter = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name != "tokenferry_requests_total":
                continue
            if s.labels["route"] == route or (route is None and s.labels["route"].startswith("/v1/")):
                counts[s.labels["outcome"]] += int(s.value)
    return counts


def _poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    """`read()` until `done` says so or time runs out; the last value read."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """For Popen's preexec_fn: the child is killed (SIGKILL) when the thread that started it ends, so a test
    or bench process that crashes or is killed takes its servers with it instead of leaving them running.

    The kernel ties this to the starting thread, not its process: start servers from a thread that lives as
    long as they should (the main thread, as the tests' fixtures and the benches do). None off Linux.
    """
    if _LIBC is None:
        return None
    prctl, getppid, exit_now = _LIBC.prctl, os.getppid, os._exit  # bound before the fork

    def arm() -> None:  # runs in the child between fork and exec: nothing here may take a lock
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if getppid() != parent:  # the parent died before the line above took effect
            exit_now(1)

    return arm


def tokenferry(port: int) -> list[str]:
    return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)]


class ServerProcess:
    """A server on 127.0.0.1 (tokenferry unless `launcher` says otherwise); `url` once ready.

    Logs go to a file for post-mortems. `new_session` starts it in a session and process group of its own
    (whose id is its pid), for a server of several processes that is signalled as a whole with os.killpg.
    """

    def __init__(
        self,
        *flags: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        launcher: Callable[[int], list[str]] = tokenferry,
        ready_path: str = "/ready",
        new_session: bool = False,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [*launcher(self.port), *flags]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent(os.getpid()),
            start_new_session=new_session,
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.logs()}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(self.metrics(), name, **labels)

    def outcomes(self, route: str | None = None) -> Counter:
        return request_outcomes(self.metrics(), route)

    def tracked(self) -> dict[str, int]:
        """What the engine still holds (waiting, running, tracked), from /health."""
        return httpx.get(f"{self.url}/health", timeout=10).json()["requests"]

    def settle(self, timeout: float = 60) -> dict[str, int]:
        """Wait until the engine holds nothing; return what it holds at the end."""
        return _poll(self.tracked, lambda held: not any(held.values()), timeout)

    def counted_since(self, before: Counter, total: int, route: str | None = None, timeout: float = 30) -> Counter:
        """Wait until `total` more requests are counted than in `before` (a response's count can trail
        its last byte); return the difference by outcome."""
        return _poll(lambda: self.outcomes(route) - before, lambda delta: sum(delta.values()) >= total, timeout)

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
