"""Two replicas behind the real SGLang Model Gateway (`sglang-router`), on loopback, with the tiny model.

The gateway registers each replica from what it answers (/server_info, /model_info), routes conversations
back to the replica that cached them with `cache_aware`, and stops sending to a replica that died or drains.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.gateway import gateway_binary, gateway_workers, start_gateway
from bench.process import ServerProcess

pytestmark = pytest.mark.skipif(gateway_binary() is None, reason="sglang-router is not installed (the test extra has it)")

CONVERSATIONS = 3  # odd: round robin then sends each conversation's consecutive turns to different replicas
TURNS = 3
# Fast health checks, so a dead or draining replica leaves the rotation within about a second.
FAST_CHECKS = ("--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--log-level", "warn")


def tiny_replica(log_dir: Path) -> ServerProcess:
    return ServerProcess("--model", "tiny", "--log-level", "warning", "--drain-timeout", "30", log_dir=log_dir)


@pytest.fixture(scope="module")
def replicas(server_logs: Path) -> Iterator[list[ServerProcess]]:
    started = [tiny_replica(server_logs) for _ in range(2)]
    try:
        yield [r.wait_ready() for r in started]
    finally:
        for r in started:
            r.terminate()


def chat(url: str, messages: list[dict], max_tokens: int = 8) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def reuse_share(url: str, tag: str) -> float:
    """Turn by turn across the conversations, in a fixed order: the share of the prompt tokens of turns 2+
    that the serving replica read from its prefix cache."""
    histories = [
        [{"role": "system", "content": f"{tag} conversation {i}: " + " ".join(f"fact {tag}-{i}-{k} is {k * 7 % 13}." for k in range(30))}]
        for i in range(CONVERSATIONS)
    ]
    cached = prompt = 0
    for turn in range(TURNS):
        for history in histories:
            history.append({"role": "user", "content": f"What is fact {turn}?"})
            answer = chat(url, history)
            history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            if turn:
                cached += answer["usage"]["prompt_tokens_details"]["cached_tokens"]
                prompt += answer["usage"]["prompt_tokens"]
    return cached / prompt


def test_the_gateway_registers_each_replica_under_its_model(replicas: list[ServerProcess], server_logs: Path) -> None:
    gateway = start_gateway([r.url for r in replicas], "round_robin", server_logs, "--log-level", "warn")
    try:
        workers = gateway_workers(gateway)
        assert sorted(w["url"] for w in workers) == sorted(r.url for r in replicas)
        for worker in workers:
            assert worker["model_id"] == "tiny"
            assert worker["metadata"]["served_model_name"] == "tiny" and worker["metadata"]["model_type"] == "llama"
        assert httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
    finally:
        gateway.terminate()


def test_power_of_two_reads_each_replica_s_load(replicas: list[ServerProcess], server_logs: Path) -> None:
    """power_of_two polls /get_load (every second here): a replica without it reads -1, and the choice is
    random; with it, the less loaded of two replicas takes the request."""
    gateway = start_gateway([r.url for r in replicas], "power_of_two", server_logs, "--worker-startup-check-interval", "1", "--log-level", "warn")
    try:
        time.sleep(2.5)
        loads = httpx.get(f"{gateway.url}/get_loads", timeout=10).json()["workers"]
        assert sorted(w["worker"] for w in loads) == sorted(r.url for r in replicas)
        assert all(w["load"] == 0 for w in loads), loads  # idle, and read (an unreadable load is -1)
        for i in range(4):
            chat(gateway.url, [{"role": "user", "content": f"load {i}"}])
    finally:
        gateway.terminate()


def test_cache_aware_routing_reuses_far_more_of_each_conversation_than_round_robin(
    replicas: list[ServerProcess], server_logs: Path
) -> None:
    shares = {}
    served = {}
    for policy in ("round_robin", "cache_aware"):
        before = [r.outcomes() for r in replicas]
        gateway = start_gateway([r.url for r in replicas], policy, server_logs, "--log-level", "warn")
        try:
            shares[policy] = reuse_share(gateway.url, policy)  # conversations of its own: no reuse across policies
        finally:
            gateway.terminate()
        served[policy] = [sum((r.outcomes() - b).values()) for r, b in zip(replicas, before)]
    # Round robin sends every second turn of a conversation to the replica that never saw it (turn 2 reuses
    # nothing, turn 3 its first turn's prompt: measured 0.46); cache_aware sends every turn back to the replica
    # that holds the conversation so far (measured 0.93).
    assert shares["cache_aware"] >= 0.85, shares
    assert shares["cache_aware"] >= 1.5 * shares["round_robin"], shares
    assert sum(served["round_robin"]) == CONVERSATIONS * TURNS and min(served["round_robin"]) > 0, served
    # Each conversation stayed whole on one replica. (One request at a time, as here, is no load: cache_aware
    # then sends a new conversation to the least loaded replica, which is the first; under load it spreads.)
    assert sum(served["cache_aware"]) == CONVERSATIONS * TURNS and all(n % TURNS == 0 for n in served["cache_aware"]), served


def stream(url: str, index: int, first_token: threading.Barrier, results: dict) -> None:
    """One long chat stream through the gateway; records how it ended."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"story {index}"}], "max_tokens": 400, "ignore_eos": True, "stream": True}
    outcome, waiting = "no [DONE]", True
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if waiting and line.startswith("data: "):
                    waiting = False
                    first_token.wait(30)
                if line == "data: [DONE]":
                    outcome = "done"
                elif line.startswith("data: ") and "error" in json.loads(line[6:]):
                    outcome = "error event"
    except httpx.TransportError as exc:
        outcome = f"cut: {type(exc).__name__}"
    finally:
        if waiting:
            first_token.abort()
    results[index] = outcome


def run_streams_while(url: str, count: int, event: Callable[[], None]) -> dict[int, str]:
    """`count` streams through the gateway; once each has its first token, `event()`; how each ended."""
    results: dict[int, str] = {}
    first_token = threading.Barrier(count + 1)
    threads = [threading.Thread(target=stream, args=(url, i, first_token, results)) for i in range(count)]
    for t in threads:
        t.start()
    first_token.wait(60)
    event()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a stream hangs"
    return results


def new_requests_all_answered(url: str, count: int, streams: dict[int, str]) -> None:
    for i in range(count):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"after {i}"}], "max_tokens": 3}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, (i, response.text, streams)


@pytest.mark.parametrize("how", ["killed", "drained"])
def test_a_replica_that_goes_away_mid_run(how: str, server_logs: Path) -> None:
    """Killed: its streams are cut (a transport error, never a hang), the other replica's finish. Drained
    (SIGTERM, as a rolling update does): its streams finish too. Either way new requests go to the other
    replica, and every request is accounted for."""
    leaving, staying = started = [tiny_replica(server_logs) for _ in range(2)]
    try:
        for r in started:
            r.wait_ready()
        gateway = start_gateway([r.url for r in started], "round_robin", server_logs, *FAST_CHECKS)
        try:
            before = staying.outcomes()
            signal_ = signal.SIGKILL if how == "killed" else signal.SIGTERM
            results = run_streams_while(gateway.url, 6, lambda: leaving.process.send_signal(signal_))
            time.sleep(2)  # two health checks: the gateway has taken it out
            new_requests_all_answered(gateway.url, 4, results)
        finally:
            gateway.terminate()
        outcomes = sorted(results.values())
        done = outcomes.count("done")
        if how == "killed":
            assert done == 3 and all(o.startswith("cut") for o in outcomes if o != "done"), outcomes
        else:
            assert done == 6, outcomes
            assert leaving.process.wait(60) == 0  # drained, then exited cleanly
        # The staying replica counted its three streams and every request that came after.
        counted = staying.counted_since(before, 3 + 4)
        assert sum(counted.values()) == 3 + 4, (counted, outcomes)
    finally:
        for r in started:
            r.terminate()
