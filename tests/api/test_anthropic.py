"""Anthropic's Messages API through the `anthropic` package, on the tiny model: text whole and streamed, a tool
loop, count_tokens, Anthropic's error shape and status codes, and the same answer as a chat completion."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from bench.process import ServerProcess
from tests.api.documented import assert_documented
from tests.api.test_tools import SCHEMAS, WEATHER
from server.config import Config
from tests.api.test_errors import in_process
from tests.conftest import API_KEY

QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOOL = {"name": "get_weather", "description": WEATHER["function"]["description"], "input_schema": WEATHER["function"]["parameters"]}
GREEDY = {"temperature": 0}  # no longer a keyword of the package's create(); the API still takes it


def client(server: ServerProcess, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def assert_anthropic_error(response: httpx.Response, status: int, kind: str, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and mentions in body["error"]["message"], body
    assert "Traceback" not in body["error"]["message"]
    assert_documented(response)


def test_text_whole_and_streamed_is_the_same_answer_as_a_chat_completion(tiny_server: ServerProcess) -> None:
    messages = client(tiny_server)
    whole = messages.messages.create(model="tiny", max_tokens=12, messages=QUESTION, system="Be brief.", extra_body=GREEDY)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == "tiny"
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    [block] = whole.content
    with messages.messages.stream(model="tiny", max_tokens=12, messages=QUESTION, system="Be brief.", extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == block.text == final.content[0].text
    # The same conversation through chat completions: the same prompt, the same greedy tokens.
    body = {"messages": [{"role": "system", "content": "Be brief."}, *QUESTION], "max_tokens": 12, "temperature": 0}
    chat = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert chat["choices"][0]["message"]["content"] == block.text
    usage = whole.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]


def test_a_stop_sequence_is_reported_as_the_reason(tiny_server: ServerProcess) -> None:
    first = client(tiny_server).messages.create(model="tiny", max_tokens=12, messages=QUESTION, extra_body=GREEDY).content[0].text
    stop = first.strip()[2:4]
    answer = client(tiny_server).messages.create(model="tiny", max_tokens=12, messages=QUESTION, stop_sequences=[stop], extra_body=GREEDY)
    assert (answer.stop_reason, answer.stop_sequence) == ("stop_sequence", stop)
    assert stop not in answer.content[0].text and first.startswith(answer.content[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_any_then_the_result_then_text(tiny_server: ServerProcess, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": "tiny", "max_tokens": 200, "tools": [TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": QUESTION, "extra_body": GREEDY,
    }  # fmt: skip
    if stream:
        with client(tiny_server).messages.stream(**kwargs) as events:
            kinds = [event.type for event in events]
            answer = events.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert kinds.count("content_block_start") == 1 and kinds.count("input_json") > 3  # the arguments grow
    else:
        answer = client(tiny_server).messages.create(**kwargs)
    assert answer.stop_reason == "tool_use"
    [call] = answer.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id
    jsonschema.validate(call.input, SCHEMAS["get_weather"])
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12 degrees, rain"}]}
    history = [*QUESTION, {"role": "assistant", "content": [block.model_dump() for block in answer.content]}, result]
    text = client(tiny_server).messages.create(model="tiny", max_tokens=10, tools=[TOOL], tool_choice={"type": "none"}, messages=history)
    assert text.stop_reason in ("end_turn", "max_tokens") and [b.type for b in text.content] == ["text"]


def test_count_tokens_counts_what_create_would_run(tiny_server: ServerProcess) -> None:
    messages = client(tiny_server)
    counted = messages.messages.count_tokens(model="tiny", messages=QUESTION, tools=[TOOL], system="Be brief.")
    ran = messages.messages.create(model="tiny", max_tokens=1, messages=QUESTION, tools=[TOOL], system="Be brief.", tool_choice={"type": "none"})
    assert counted.input_tokens == ran.usage.input_tokens + ran.usage.cache_read_input_tokens > 0


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "messages[0].content[0]"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:1", "name": "x"}]}, "mcp_servers"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0]"),
        ({"tool_choice": {"type": "tool", "name": "nothing"}, "tools": [TOOL]}, "tool_choice.name"),
        ({"tools": [{"name": "t", "input_schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}]}, "tools[0].input_schema"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "Sure"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]}, "tool_use_id"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"model": "claude-opus-4"}, "claude-opus-4"),
    ],
)
def test_bad_requests_are_anthropic_errors_naming_the_field(tiny_server: ServerProcess, body: dict[str, Any], mentions: str) -> None:
    full = {"model": "tiny", "max_tokens": 5, "messages": QUESTION, **body}
    response = httpx.post(f"{tiny_server.url}/v1/messages", json=full, timeout=60)
    assert_anthropic_error(response, 404 if "claude" in mentions else 400, "not_found_error" if "claude" in mentions else "invalid_request_error", mentions)


def test_the_client_sees_a_prompt_over_the_context_and_a_wrong_key(tiny_server: ServerProcess, locked_server: ServerProcess) -> None:
    with pytest.raises(anthropic.BadRequestError) as over:
        client(tiny_server).messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "word " * 3000}])
    assert over.value.body["error"]["type"] == "invalid_request_error" and "context" in over.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        client(locked_server, key="wrong").messages.create(model="tiny", max_tokens=5, messages=QUESTION)
    assert client(locked_server, key=API_KEY).messages.count_tokens(model="tiny", messages=QUESTION).input_tokens > 0
    assert_anthropic_error(httpx.post(f"{locked_server.url}/v1/messages", json={}, timeout=30), 401, "authentication_error")


def test_a_full_queue_is_429_on_the_agent_routes(locked_server: ServerProcess) -> None:
    """One row runs and two wait (--max-batch-size 1, --max-waiting 2): the next request, whatever its API, is a 429."""
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": "tiny", "prompt": "go", "max_tokens": 1000, "ignore_eos": True}
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(httpx.post, f"{locked_server.url}/v1/completions", json=long, headers=bearer, timeout=120) for _ in range(3)]
        deadline = time.monotonic() + 30
        while locked_server.metric("tokenferry_waiting_requests") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        message = {"model": "tiny", "max_tokens": 5, "messages": QUESTION}
        refused = httpx.post(f"{locked_server.url}/v1/messages", json=message, headers={"x-api-key": API_KEY}, timeout=30)
        assert_anthropic_error(refused, 429, "rate_limit_error")
        assert refused.headers["retry-after"].isdigit()
        response = httpx.post(f"{locked_server.url}/v1/responses", json={"model": "tiny", "input": "hi"}, headers=bearer, timeout=30)
        assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        assert all(f.result().status_code == 200 for f in busy)


def test_while_loading_messages_are_529_overloaded_and_responses_503() -> None:
    async def main() -> tuple[httpx.Response, httpx.Response]:
        test_client, _ = in_process(Config(model="tiny"))  # no lifespan here: the model never finishes loading
        async with test_client:
            message = await test_client.post("/v1/messages", json={"model": "tiny", "max_tokens": 5, "messages": QUESTION})
            response = await test_client.post("/v1/responses", json={"input": "hi"})
            return message, response

    message, response = asyncio.run(main())
    assert_anthropic_error(message, 529, "overloaded_error", "loading")
    assert message.headers["retry-after"] and response.headers["retry-after"]
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
    assert_documented(response)


def test_a_streamed_message_is_anthropics_event_sequence(tiny_server: ServerProcess) -> None:
    body = {"model": "tiny", "max_tokens": 6, "messages": QUESTION, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/messages", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == events
    assert events[:3] == ["message_start", "ping", "content_block_start"]
    assert events[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert data[-2]["delta"]["stop_reason"] == "max_tokens" and data[-2]["usage"]["output_tokens"] == 6
