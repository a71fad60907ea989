"""Tool calling over HTTP on the tiny model, with real clients: the `openai` package through a two-turn tool loop
(whole and streamed, auto, required and named), an agent framework running its own loop, tool conversations,
and every bad input a 400 naming its field."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest

from bench.process import ServerProcess
from tests.api.test_openai_client import async_client, client

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is the weather in Oslo, and what time is it?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 12, "maxLength": 24}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False},
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
CHOICES = ["required", {"type": "function", "function": {"name": "get_weather"}}]


def ask(server: ServerProcess, tool_choice: Any, stream: bool, seed: int, **extra: Any) -> tuple[str | None, list[dict[str, Any]], str, list[Any]]:
    """One turn through the openai client: (content, calls as dicts, finish_reason, chunks when streamed)."""
    kwargs = {"model": "tiny", "messages": extra.pop("messages", QUESTION), "tools": [WEATHER, TIME], "tool_choice": tool_choice,
              "max_tokens": 200, "temperature": 0.8, "seed": seed, **extra}  # fmt: skip
    if not stream:
        choice = client(server).chat.completions.create(**kwargs).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason, []
    chunks = list(client(server).chat.completions.create(**kwargs, stream=True))
    content, calls, finish = "", {}, None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": part.id, "type": part.type, "function": {"name": part.function.name, "arguments": ""}})
            call["function"]["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish, chunks


def assert_valid(calls: list[dict[str, Any]]) -> None:
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", CHOICES)
def test_a_two_turn_tool_loop_with_the_openai_client(tiny_server: ServerProcess, tool_choice: Any, stream: bool) -> None:
    # One call: a random model allowed several goes on calling until max_tokens (the grammar tests cover several).
    content, calls, finish, _ = ask(tiny_server, tool_choice, stream, seed=3, parallel_tool_calls=False)
    assert finish == "tool_calls" and content is None
    assert_valid(calls)
    if isinstance(tool_choice, dict):
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
    # The call goes back with its result; the model answers in text.
    results = [{"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"ok": True})} for c in calls]
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": calls}, *results]
    content, again, finish, _ = ask(tiny_server, "none", stream, seed=4, messages=history)
    assert not again and finish in ("stop", "length") and content


def test_a_streamed_call_grows_header_first_then_its_arguments_in_fragments(tiny_server: ServerProcess) -> None:
    whole_content, whole_calls, _, _ = ask(tiny_server, CHOICES[1], False, seed=5)
    content, calls, finish, chunks = ask(tiny_server, CHOICES[1], True, seed=5)
    assert (content, finish) == (whole_content, "tool_calls")
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]  # the same answer, ids aside
    parts = [p for chunk in chunks for p in chunk.choices[0].delta.tool_calls or []]
    assert parts[0].id and parts[0].type == "function" and parts[0].function.name == "get_weather"
    fragments = [p.function.arguments for p in parts[1:]]
    assert len(fragments) > 3 and all(p.id is None and p.function.name is None for p in parts[1:])


def test_auto_answers_in_text_or_in_valid_calls_and_parallel_false_makes_one(tiny_server: ServerProcess) -> None:
    """The tiny random model picks freely between text and calls in "auto"; whichever it picks is well formed."""
    for seed in range(4):
        content, calls, finish, _ = ask(tiny_server, "auto", seed % 2 == 1, seed=seed, max_tokens=60)
        if calls:
            assert finish in ("tool_calls", "length")
            if finish == "tool_calls":
                assert_valid(calls)
        else:
            assert finish in ("stop", "length") and content is not None
    for seed in range(3):
        _, calls, finish, _ = ask(tiny_server, "required", False, seed=seed, parallel_tool_calls=False)
        assert len(calls) == 1 and finish == "tool_calls"


def run_weather_agent(model_class: str, server: ServerProcess, settings: dict[str, Any], **agent: Any) -> tuple[Any, list[str]]:
    """The OpenAI Agents SDK with one Python function tool, its `model_class` pointed at the server: the run's
    result, and the cities the tool was called for."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Oslo", "Bergen"]) -> str:  # an enum: the random model's call ends in a few tokens
        """The weather in a city."""
        seen.append(city)
        return f"It is sunny in {city}."

    model = getattr(agents, model_class)(model="tiny", openai_client=async_client(server))
    model_settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=120, **settings)
    weather = agents.Agent(name="weather", instructions="Answer briefly.", model=model, model_settings=model_settings,
                           tools=[get_weather], **agent)  # fmt: skip
    return asyncio.run(agents.Runner.run(weather, "What is the weather in Oslo?", max_turns=4)), seen


def test_an_agent_framework_runs_its_own_tool_loop_to_the_end(tiny_server: ServerProcess) -> None:
    """The OpenAI Agents SDK, its chat-completions model pointed at the server: the first turn must call the
    tool (the SDK then resets tool_choice to auto), the tool runs in the SDK, and the run ends with text."""
    result, seen = run_weather_agent("OpenAIChatCompletionsModel", tiny_server, {"temperature": 0.8, "extra_body": {"seed": 7}})
    assert seen in (["Oslo"], ["Bergen"])
    assert isinstance(result.final_output, str)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"messages": QUESTION, "tools": [WEATHER, {"type": "function", "function": {"name": "odd", "parameters": {"type": "string", "format": "shoe-size"}}}]},
         "tools[1].function.parameters"),
        ({"messages": QUESTION, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools"),
        ({"messages": [*QUESTION, {"role": "tool", "content": "3 C", "tool_call_id": "call_nope"}]}, "messages[1].tool_call_id"),
        ({"messages": [*QUESTION, {"role": "tool", "content": "3 C"}]}, "messages[1].tool_call_id"),
        ({"messages": [*QUESTION, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
    ],
)  # fmt: skip
def test_bad_tool_inputs_are_400s_naming_the_field(tiny_server: ServerProcess, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{tiny_server.url}{CHAT}", json={"model": "tiny", "max_tokens": 4, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_a_refused_tool_request_is_an_openai_bad_request(tiny_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(tiny_server).chat.completions.create(
            model="tiny", messages=QUESTION, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
        )
    assert info.value.body["param"] == "tool_choice.function.name"
