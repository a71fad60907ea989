"""Raw Server-Sent Events read with httpx: framing, order, headers, and tokens flushed as they are made."""

from __future__ import annotations

import json

import httpx

from bench.process import ServerProcess

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, "ignore_eos": True}


def events(lines) -> list[str]:
    """The `data:` payloads of an SSE stream; every event is one `data:` line followed by a blank line."""
    payloads, previous = [], None
    for line in lines:
        if line.startswith("data: "):
            payloads.append(line.removeprefix("data: "))
        else:
            assert line == "" and previous is not None and previous.startswith("data: "), f"unexpected line {line!r}"
        previous = line
    return payloads


def test_chunk_order_usage_and_done(tiny_server: ServerProcess) -> None:
    body = {**CHAT, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-request-id"]
        payloads = events(response.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == "tiny" and isinstance(c["created"], int) for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks[1:-2]]
    assert content and all(c["choices"][0]["finish_reason"] is None and "content" in c["choices"][0]["delta"] for c in content)
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "length" and finish["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_the_first_token_arrives_before_the_last_is_made(tiny_server: ServerProcess) -> None:
    body = {**CHAT, "max_tokens": 600, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == 2:
                    break
        # Two tokens in hand while the server is still generating this very request.
        assert tiny_server.metric("tokenferry_running_requests") >= 1
        payloads = events(list(lines)[1:])
    assert payloads[-1] == "[DONE]"


def test_completion_stream_framing(tiny_server: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body, timeout=60) as response:
        payloads = events(response.iter_lines())
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert payloads[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1], "usage only when stream_options.include_usage asks for it"
