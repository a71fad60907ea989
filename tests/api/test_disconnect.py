"""A client that disconnects mid-stream cancels its request: its row leaves the batch and the cancel is counted."""

from __future__ import annotations

import time

import httpx
import pytest

from bench.process import ServerProcess

# The real model makes a long answer take a minute: ample time to watch the row while it runs.
pytestmark = pytest.mark.slow
LONG = 1000


def wait_for(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_mid_stream_frees_the_row(smol_server: ServerProcess) -> None:
    route = "/v1/chat/completions"
    cancelled_before = smol_server.metric("tokenferry_requests_total", route=route, outcome="cancelled")
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{smol_server.url}{route}", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept referenced: closing this generator would close the connection
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        assert smol_server.metric("tokenferry_running_requests") == 1
        lines.close()
    # Closing the line iterator closed the connection mid-stream.
    assert wait_for(lambda: smol_server.metric("tokenferry_running_requests") == 0), "the row was not freed"
    assert wait_for(lambda: smol_server.metric("tokenferry_requests_total", route=route, outcome="cancelled") == cancelled_before + 1)


def test_disconnect_while_waiting_for_a_non_streamed_answer(smol_server: ServerProcess) -> None:
    route = "/v1/completions"
    cancelled_before = smol_server.metric("tokenferry_requests_total", route=route, outcome="cancelled")
    body = {"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{smol_server.url}{route}", json=body, timeout=2.0)
    assert wait_for(lambda: smol_server.metric("tokenferry_requests_total", route=route, outcome="cancelled") == cancelled_before + 1)
    assert wait_for(lambda: smol_server.metric("tokenferry_running_requests") == 0)


@pytest.mark.parametrize(
    ("route", "body", "text_marker"),
    [
        ("/v1/messages", {"max_tokens": LONG, "stream": True,
                          "messages": [{"role": "user", "content": "Write a very long story about a dragon."}]}, '"text_delta"'),
        ("/v1/responses", {"max_output_tokens": LONG, "stream": True,
                           "input": "Write a very long story about a dragon."}, '"response.output_text.delta"'),
    ],
)  # fmt: skip
def test_disconnect_mid_stream_frees_the_row_on_the_agent_routes(smol_server: ServerProcess, route: str, body: dict, text_marker: str) -> None:
    cancelled_before = smol_server.metric("tokenferry_requests_total", route=route, outcome="cancelled")
    model = httpx.get(f"{smol_server.url}/v1/models", timeout=30).json()["data"][0]["id"]  # Anthropic's API requires it
    body = {**body, "model": model}
    with httpx.stream("POST", f"{smol_server.url}{route}", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if text_marker in line:
                break
        assert smol_server.metric("tokenferry_running_requests") == 1
        lines.close()
    assert wait_for(lambda: smol_server.metric("tokenferry_running_requests") == 0), "the row was not freed"
    assert wait_for(lambda: smol_server.metric("tokenferry_requests_total", route=route, outcome="cancelled") == cancelled_before + 1)
