"""Structured output over HTTP on the tiny model: response_format and structured_outputs with the official
client, streaming equal to the whole answer, bad inputs as 400s, and the grammar cache (tools: test_tools.py)."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pydantic
import pytest

from bench.process import ServerProcess
from tests.api.test_openai_client import client

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Describe a ferry as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "decks": {"type": "integer", "minimum": 1, "maximum": 4},
        "ports": {"type": "array", "items": {"enum": ["Oslo", "Kiel", "Bergen"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "decks", "ports"],
    "additionalProperties": False,
}
def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "ferry", "schema": schema, "strict": True}}


def post(server: ServerProcess, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json={"model": "tiny", **body}, timeout=120)


def stream_text(server: ServerProcess, route: str, body: dict) -> tuple[str, str]:
    """(concatenated deltas, finish reason) of a streamed request."""
    text, reason = [], None
    with httpx.stream("POST", f"{server.url}{route}", json={"model": "tiny", **body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
            reason = choice["finish_reason"] or reason
    return "".join(text), reason


def test_chat_json_schema_answers_validate(tiny_server: ServerProcess) -> None:
    for seed in range(4):
        body = {"messages": MESSAGES, "response_format": response_format(SCHEMA), "max_tokens": 200, "temperature": 1.0, "seed": seed}
        answer = post(tiny_server, CHAT, body).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", answer
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object_mode_and_completions_with_a_schema(tiny_server: ServerProcess) -> None:
    answer = post(tiny_server, COMPLETIONS, {"prompt": "A ferry:", "response_format": response_format(SCHEMA), "max_tokens": 200, "n": 2, "temperature": 0.9, "seed": 1}).json()
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)
    answer = post(tiny_server, CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}, "max_tokens": 300, "temperature": 0}).json()
    choice = answer["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: still the start of an object
        assert choice["message"]["content"].lstrip().startswith("{")


def test_choice_and_regex(tiny_server: ServerProcess) -> None:
    for seed in range(5):
        body = {"prompt": "Is it raining?", "structured_outputs": {"choice": ["yes", "no"]}, "max_tokens": 10, "temperature": 1.0, "seed": seed}
        choice = post(tiny_server, COMPLETIONS, body).json()["choices"][0]
        assert choice["text"] in ("yes", "no") and choice["finish_reason"] == "stop"
    pattern = r"[0-9]{3}-[A-Z]{2}"  # Rust regex syntax: \d would also allow any Unicode digit
    body = {"messages": MESSAGES, "structured_outputs": {"regex": pattern}, "max_tokens": 20, "temperature": 1.0, "seed": 2}
    choice = post(tiny_server, CHAT, body).json()["choices"][0]
    assert re.fullmatch(pattern, choice["message"]["content"]) and choice["finish_reason"] == "stop"
    grammar = 'start: "ferry " NUM\nNUM: /[1-9][0-9]?/'
    body = {"prompt": "x", "structured_outputs": {"grammar": grammar}, "max_tokens": 20, "temperature": 1.0, "seed": 4}
    assert re.fullmatch(r"ferry [1-9][0-9]?", post(tiny_server, COMPLETIONS, body).json()["choices"][0]["text"])


def test_streaming_equals_the_whole_answer(tiny_server: ServerProcess) -> None:
    for route, body in (
        (CHAT, {"messages": MESSAGES, "response_format": response_format(SCHEMA), "max_tokens": 200, "temperature": 0.8, "seed": 11}),
        (COMPLETIONS, {"prompt": "A ferry:", "structured_outputs": {"json": SCHEMA}, "max_tokens": 12, "temperature": 0.8, "seed": 5}),
    ):
        whole = post(tiny_server, route, body).json()["choices"][0]
        text, reason = stream_text(tiny_server, route, body)
        assert text == (whole["message"]["content"] if route == CHAT else whole["text"])
        assert reason == whole["finish_reason"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (CHAT, {"messages": MESSAGES, "response_format": response_format({"not": {"type": "string"}})}, "response_format.json_schema.schema"),
        (CHAT, {"messages": MESSAGES, "response_format": response_format({"type": "string", "pattern": "(("})}, "response_format.json_schema.schema"),
        (CHAT, {"messages": MESSAGES, "response_format": response_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}})}, "response_format.json_schema.schema"),
        (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
        (CHAT, {"messages": MESSAGES, "response_format": response_format({"enum": ["x" * 70000]})}, "response_format.json_schema.schema"),
        (COMPLETIONS, {"prompt": "x", "structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        (COMPLETIONS, {"prompt": "x", "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        (COMPLETIONS, {"prompt": "x", "structured_outputs": {"grammar": "start: (("}}, "structured_outputs.grammar"),
        (COMPLETIONS, {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        (COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        (COMPLETIONS, {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_and_the_server_keeps_serving(tiny_server: ServerProcess, route: str, body: dict, param: str) -> None:
    response = post(tiny_server, route, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "Traceback" not in error["message"]
    after = post(tiny_server, COMPLETIONS, {"prompt": "x", "structured_outputs": {"choice": ["ok"]}, "max_tokens": 4})
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == "ok"


def test_the_same_schema_twice_hits_the_cache(tiny_server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}, "required": ["cached"], "additionalProperties": False}
    hits, misses = tiny_server.metric("tokenferry_grammar_cache_total", result="hit"), tiny_server.metric("tokenferry_grammar_cache_total", result="miss")
    for _ in range(2):
        answer = post(tiny_server, CHAT, {"messages": MESSAGES, "response_format": response_format(schema), "max_tokens": 60})
        assert answer.status_code == 200
    assert tiny_server.metric("tokenferry_grammar_cache_total", result="miss") - misses == 1
    assert tiny_server.metric("tokenferry_grammar_cache_total", result="hit") - hits == 1
    assert tiny_server.metric("tokenferry_grammar_mask_seconds_count") > 0


# ---- the official client ----


class Ferry(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    decks: int = pydantic.Field(ge=1, le=4)
    kind: Literal["car", "foot"]


def test_openai_client_parse_with_a_pydantic_model(tiny_server: ServerProcess) -> None:
    completion = client(tiny_server).chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Ferry, max_tokens=200, temperature=0.5, seed=3
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Ferry) and 1 <= message.parsed.decks <= 4


