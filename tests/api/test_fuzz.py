"""Fuzzing the HTTP surface: schemathesis against /openapi.json with every check, and the classic hand-written
abuses.

schemathesis runs as a user would run it (`schemathesis run URL/openapi.json --checks all`), so it holds the
document to the truth as much as the server to the document: every status, media type, header and body the
server answers must be documented, every body the document admits must be accepted and every body it rejects
refused. tests/api/fuzz_hooks.py caps the tokens a request may generate (cost) and excuses the two limits
that JSON Schema cannot state; nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from bench.process import ServerProcess
from server.app import create_app
from server.config import Config
from tests.api.documented import assert_documented

ROOT = Path(__file__).resolve().parents[2]
SEED = 1
EXAMPLES_PER_ROUTE = 60
REPORT = "events.ndjson"  # schemathesis' events, as it writes them
# The operations that take input (a body or a path parameter), read from the application itself (no model
# is loaded for that); those without input have a single possible request.
DOCUMENT = create_app(Config(model="tiny")).openapi()
WITH_INPUT = sorted(
    f"{method.upper()} {path}"
    for path, methods in DOCUMENT["paths"].items()
    for method, spec in methods.items()
    if spec.get("requestBody") or spec.get("parameters")
)
OPERATIONS = sorted(f"{method.upper()} {path}" for path, methods in DOCUMENT["paths"].items() for method in methods)


def schemathesis_run(url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """The CLI, in `workdir`: its crash cache (.schemathesis/) stays out of the tree and out of the next run."""
    command = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "run", f"{url}/openapi.json", "--checks", "all", "--seed", str(SEED), "--max-examples", str(EXAMPLES_PER_ROUTE),
        "--workers", "1", "--continue-on-failure", "--request-timeout", "60", "--generation-database", "none",
        "--output-sanitize", "false", "--no-color", "--report", "ndjson", "--report-ndjson-path", str(workdir / REPORT),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.fuzz_hooks", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def read_report(report: Path) -> tuple[Counter, Counter]:
    """From schemathesis' events: generated cases per (phase, operation), and answers per (operation, status)."""
    cases: Counter = Counter()
    answers: Counter = Counter()
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if event is None:
            continue
        recorder = event["recorder"]
        cases[event["phase"], recorder["label"]] += len(recorder.get("cases", {}))
        for interaction in recorder.get("interactions", {}).values():
            if interaction.get("response"):
                answers[recorder["label"], interaction["response"]["status_code"]] += 1
    return cases, answers


def test_schemathesis_with_every_check_finds_nothing(tiny_server: ServerProcess, tmp_path: Path) -> None:
    result = schemathesis_run(tiny_server.url, tmp_path)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "No issues found" in result.stdout, result.stdout[-5000:]
    cases, answers = read_report(tmp_path / REPORT)
    for operation in WITH_INPUT:
        assert cases["fuzzing", operation] >= EXAMPLES_PER_ROUTE, (operation, cases)
    # Not a vacuous pass: every operation was answered 200 for some generated request.
    for operation in OPERATIONS:
        assert answers[operation, 200] > 0, (operation, answers)


def assert_openai_error(response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and "Traceback" not in body["error"]["message"]
    assert_documented(response)


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000000000000000}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 1e400}', 400),
        (b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user"}]}', 200),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
        (b'{"model": "tiny", "messages": []}', 400),
        (b'{"model": "tiny", "messages": "hello"}', 400),
        (b'{"model": ["tiny"], "messages": []}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": "yes"}}', 400),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]' + b" " * 10, 400),
        (b"null", 400),
        (b'"a string"', 400),
        (b"{" * 5000 + b"}" * 5000, 400),
    ],
)
def test_hand_written_abuse(tiny_server: ServerProcess, raw: bytes, status: int) -> None:
    response = httpx.post(f"{tiny_server.url}{CHAT}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    if status >= 400:
        assert_openai_error(response)


def test_a_prompt_over_the_context_and_a_huge_body(tiny_server: ServerProcess) -> None:
    long = {"model": "tiny", "prompt": "word " * 5000, "max_tokens": 1}
    response = httpx.post(f"{tiny_server.url}/v1/completions", json=long, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    huge = json.dumps({"model": "tiny", "prompt": "x" * (5 * 1024 * 1024)}).encode()
    response = httpx.post(f"{tiny_server.url}/v1/completions", content=huge, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert_openai_error(response)


def test_a_lone_surrogate_in_a_completion_prompt_is_a_400(tiny_server: ServerProcess) -> None:
    raw = b'{"model": "tiny", "prompt": ["fine", "broken \\udc80 text"]}'
    response = httpx.post(f"{tiny_server.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
