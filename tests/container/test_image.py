"""The real Dockerfile, built and run with podman: it serves, streams, runs as non-root and drains on SIGTERM."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from bench.process import free_port
from tests.container.podman import PODMAN, ULIMITS, bootstrap_base, build_image, ensure_tools, remove, run

# The image's build (a Debian base, the packages, every native level compiled) took 558 s in one run on a busy
# 2-core machine, near the suite's 600 s a test: its own steps carry their own timeouts (podman.py).
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ensure_tools()
    suffix = uuid.uuid4().hex[:8]
    base, tag = f"localhost/tokenferry-base-{suffix}", f"localhost/tokenferry-test:{suffix}"
    leftovers: set[str] = set()
    try:
        bootstrap_base(base, tmp_path_factory.mktemp("base"))
        leftovers = build_image(tag, base)
        yield tag
    finally:
        remove(images=[tag, *leftovers, base])


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, str]]:
    port = free_port()
    name = f"tokenferry-test-{port}"
    env = ["-e", "TOKENFERRY_HOST=127.0.0.1", "-e", f"TOKENFERRY_PORT={port}", "-e", "TOKENFERRY_DRAIN_TIMEOUT=60"]
    run([*PODMAN, "run", "-d", "--name", name, "--network", "host", *ULIMITS, *env, image], timeout=120)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(run([*PODMAN, "logs", name], timeout=60).stderr[-4000:])
        yield name, url
    finally:
        remove(containers=[name])


def test_the_image_serves_streams_and_drains(container: tuple[str, str]) -> None:
    name, url = container
    assert run([*PODMAN, "exec", name, "id", "-u"], timeout=60).stdout.strip() == "10001", "runs as non-root"
    run([*PODMAN, "healthcheck", "run", name], timeout=60)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    started = threading.Event()

    def stream(max_tokens: int) -> tuple[str, str | None]:
        chunks = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Tell me about ferries."}],
            max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, finish = [], None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return "".join(text), finish

    text, finish = stream(16)
    assert text and finish == "length"

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stream, 60)
        assert started.wait(60)
        run([*PODMAN, "kill", "--signal", "TERM", name], timeout=60)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/ready never turned 503"
            time.sleep(0.05)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        text, finish = in_flight.result(timeout=120)
    assert finish == "length" and text, "the request in flight finished despite the SIGTERM"
    assert run([*PODMAN, "wait", name], timeout=120).stdout.strip() == "0"
    done = run([*PODMAN, "logs", name], timeout=60)
    logs = done.stdout + done.stderr
    # Built into the image for both x86-64 levels: loaded, not compiled (the image has no compiler).
    assert "native panels" in logs and "native kernels off" not in logs, logs[-4000:]
