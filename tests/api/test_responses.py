"""OpenAI's Responses API through the `openai` package, on the tiny model: text whole and streamed, a
function-call loop, text.format with a JSON schema, the stateless refusals; and /tokenize, /detokenize."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from bench.process import ServerProcess
from tests.api.documented import assert_documented
from tests.api.test_openai_client import client
from tests.api.test_tools import SCHEMAS, WEATHER, run_weather_agent

QUESTION = "What is the weather in Oslo?"
TOOL = {"type": "function", **WEATHER["function"]}
FORMAT = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Bergen"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}  # fmt: skip


def test_text_whole_and_streamed_is_the_same_answer_as_a_chat_completion(tiny_server: ServerProcess) -> None:
    responses = client(tiny_server).responses
    whole = responses.create(model="tiny", input=QUESTION, instructions="Be brief.", max_output_tokens=12, temperature=0)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 12 and whole.output_text
    with responses.stream(model="tiny", input=QUESTION, instructions="Be brief.", max_output_tokens=12, temperature=0) as stream:
        kinds, pieces = [], []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                pieces.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert len(pieces) > 1 and "".join(pieces) == whole.output_text == final.output_text
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0}
    chat = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert chat["choices"][0]["message"]["content"] == whole.output_text
    assert chat["usage"]["prompt_tokens"] == whole.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_loop_with_function_call_output(tiny_server: ServerProcess, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": "tiny", "input": QUESTION, "tools": [TOOL], "tool_choice": "required",
                              "parallel_tool_calls": False, "max_output_tokens": 200, "temperature": 0}  # fmt: skip
    if stream:
        with client(tiny_server).responses.stream(**kwargs) as events:
            kinds = [event.type for event in events]
            response = events.get_final_response()
        assert kinds.count("response.function_call_arguments.delta") > 3 and "response.function_call_arguments.done" in kinds
    else:
        response = client(tiny_server).responses.create(**kwargs)
    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    history = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees, rain"},
    ]
    answer = client(tiny_server).responses.create(model="tiny", input=history, tools=[TOOL], tool_choice="none", max_output_tokens=10)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text


def test_text_format_json_schema_holds_the_output(tiny_server: ServerProcess) -> None:
    text = {"format": {"type": "json_schema", "name": "forecast", "schema": FORMAT, "strict": True}}
    for seed_prompt in ("Forecast, please.", "Another forecast."):
        response = client(tiny_server).responses.create(model="tiny", input=seed_prompt, text=text, max_output_tokens=80)
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), FORMAT)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, "input[0].arguments"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://127.0.0.1/x.png"}]}]}, None),
        ({"tool_choice": {"type": "function", "name": "nothing"}, "tools": [TOOL]}, "tool_choice.name"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"max_output_tokens": 5000}, "max_output_tokens"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(tiny_server: ServerProcess, body: dict[str, Any], param: str | None) -> None:
    response = httpx.post(f"{tiny_server.url}/v1/responses", json={"model": "tiny", "input": "hi", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param is None and error["param"].startswith("input[0]") or error["param"] == param, error
    assert_documented(response)


def test_the_client_sees_stateless_refusals(tiny_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(tiny_server).responses.create(model="tiny", input="hi", previous_response_id="resp_123")
    assert "keeps no state" in refused.value.message


def test_tokenize_and_detokenize_round_trip_and_count_what_chat_runs(tiny_server: ServerProcess) -> None:
    url = tiny_server.url
    tokens = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": "hello world", "return_token_strs": True}, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 1 and tokens["max_model_len"] == 1024
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json() == {"prompt": "hello world"}
    messages = [{"role": "user", "content": QUESTION}]
    counted = httpx.post(f"{url}/tokenize", json={"messages": messages, "tools": [WEATHER]}, timeout=30).json()["count"]
    ran = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 1}, timeout=30)
    assert counted == ran.json()["usage"]["prompt_tokens"]
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [1, 99999]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[1]"
    assert_documented(bad)


def test_the_three_apis_in_one_batch_answer_as_each_alone(tiny_server: ServerProcess) -> None:
    """One conversation, greedy, through chat, Messages and Responses at once: the same rows in one batch, the
    same answer each, and the same as alone (the prefix cache may serve any of them)."""
    url, question = tiny_server.url, [{"role": "user", "content": QUESTION}]
    asks = [
        ("/v1/chat/completions", {"messages": question, "max_tokens": 24, "temperature": 0}, lambda a: a["choices"][0]["message"]["content"]),
        ("/v1/messages", {"model": "tiny", "messages": question, "max_tokens": 24, "temperature": 0}, lambda a: a["content"][0]["text"]),
        ("/v1/responses", {"input": QUESTION, "max_output_tokens": 24, "temperature": 0}, lambda a: a["output"][0]["content"][0]["text"]),
    ]
    alone = [text(httpx.post(f"{url}{route}", json=body, timeout=60).json()) for route, body, text in asks]
    with ThreadPoolExecutor(len(asks) * 2) as pool:
        futures = [pool.submit(httpx.post, f"{url}{route}", json=body, timeout=60) for route, body, _ in asks * 2]
        together = [text(f.result().json()) for f, (_, _, text) in zip(futures, asks * 2)]
    assert len(set(alone)) == 1 and together == alone * 2


def test_an_agent_framework_runs_its_tool_loop_over_the_responses_api(tiny_server: ServerProcess) -> None:
    """The OpenAI Agents SDK's default model speaks the Responses API: the model's turn calls the tool and the SDK
    runs it. The run stops on that tool's output: a random model's free-text turn after it would run to
    max_output_tokens, which the SDK treats as a failed run (the function_call_output turn is tested above)."""
    result, seen = run_weather_agent("OpenAIResponsesModel", tiny_server, {"temperature": 0, "store": False},
                                     tool_use_behavior="stop_on_first_tool")  # fmt: skip
    assert seen in (["Oslo"], ["Bergen"])
    assert result.final_output == f"It is sunny in {seen[0]}."
