"""A conversation of 8 turns, replayed as a chat front end sends it (the whole history every turn), answers
the same with the prefix cache as a server started with `--prefix-cache-bytes 0`; turns 2..8 reuse the
earlier turns' KV, and the usage and the metrics say so (real model, greedy)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest

from bench.process import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = "You are a friendly tour guide of an old lighthouse. Answer in one short sentence."
TURNS = [
    "Hello! Who are you?",
    "How tall is the lighthouse?",
    "How many steps lead to the top?",
    "Who kept the light?",
    "What did he write in his logbook?",
    "Was there ever a shipwreck?",
    "What happens in winter?",
    "Thank you, goodbye!",
]


@pytest.fixture(scope="module")
def uncached_server(server_logs: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--log-level", "warning", "--prefix-cache-bytes", "0", log_dir=server_logs).wait_ready()
    yield server
    server.terminate()


def converse(server: ServerProcess, stream_last: bool) -> tuple[list[str], list[int]]:
    """Every turn's answer and its cached prompt tokens; the last turn streams, with usage."""
    messages = [{"role": "system", "content": SYSTEM}]
    answers, cached = [], []
    for turn, text in enumerate(TURNS):
        messages.append({"role": "user", "content": text})
        body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
        if stream_last and turn == len(TURNS) - 1:
            answer, usage = stream(server, body)
        else:
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            answer, usage = response.json()["choices"][0]["message"]["content"], response.json()["usage"]
        answers.append(answer)
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        messages.append({"role": "assistant", "content": answer})
    return answers, cached


def stream(server: ServerProcess, body: dict) -> tuple[str, dict]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks[-1]["usage"]


def test_eight_turns_answer_the_same_with_the_cache_and_reuse_earlier_turns(
    smol_server: ServerProcess, uncached_server: ServerProcess
) -> None:
    hits_before = smol_server.metric("tokenferry_prefix_cache_hits_total")
    reused_before = smol_server.metric("tokenferry_prefix_cache_reused_tokens_total")
    answers, cached = converse(smol_server, stream_last=True)
    plain_answers, plain_cached = converse(uncached_server, stream_last=False)
    assert answers == plain_answers
    assert plain_cached == [0] * len(TURNS)
    assert all(n > 0 for n in cached[1:]), cached
    assert all(later > earlier for earlier, later in pairwise(cached[1:])), "each turn reuses more"
    assert smol_server.metric("tokenferry_prefix_cache_hits_total") - hits_before >= len(TURNS) - 1
    assert smol_server.metric("tokenferry_prefix_cache_reused_tokens_total") - reused_before >= sum(cached)
    assert smol_server.metric("tokenferry_prefix_cache_bytes") > 0
    assert uncached_server.metric("tokenferry_prefix_cache_bytes") == 0


def test_completions_report_cached_prompt_tokens(smol_server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "The lighthouse keeper climbed the stairs. " * 8, "max_tokens": 2, "temperature": 0}
    first = httpx.post(f"{smol_server.url}/v1/completions", json=body, timeout=120).json()
    second = httpx.post(f"{smol_server.url}/v1/completions", json=body, timeout=120).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt_tokens - 1) // 16 * 16 > 0
