"""Replicas behind the SGLang Model Gateway, against one replica served directly, in one run.

    python -m bench.gateway --conversations 8 --turns 4 --out DIR

The same multi-turn conversations (each its own system prompt and history, every turn sending the whole
history as a chat front end does) run, one setup at a time, against:
1. one replica, direct;
2. the gateway in front of that one replica: the cost of the hop;
3. the gateway, `cache_aware`, in front of two replicas;
4. the gateway, `round_robin`, in front of the same two.
Each setup gets conversations of its own, so no setup reads another's prompts from a cache. Reports, per
setup, the requests each replica served, the share of prompt tokens read from a prefix cache (turns
after the first), time to first token p50 / p99, and output tokens/s. And the hop alone: one short
request at a time (one token), direct and through the gateway, latency p50.

On a machine of few cores the two replicas share its cores, so this shows routing and the hop, not scale:
each replica runs with `threads` threads (all cores for one, half each for two).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.prefix import conversations
from bench.process import ServerProcess, free_port
from bench.serve import percentile

POLICIES = ("cache_aware", "round_robin")


def gateway_binary() -> str | None:
    """`sglang-router` beside this interpreter (the venv's), else on PATH; None when not installed."""
    beside = Path(sys.executable).parent / "sglang-router"
    return str(beside) if beside.is_file() else shutil.which("sglang-router")


def gateway_launcher(workers: list[str], policy: str, *flags: str) -> Callable[[int], list[str]]:
    """A ServerProcess launcher: the gateway on 127.0.0.1 in front of `workers`.

    Workers are checked on /ready, so one that loads or drains gets no new requests; its metrics port is
    on loopback too. `flags` go to the gateway as they are.
    """
    binary = gateway_binary()
    if binary is None:
        raise RuntimeError("sglang-router is not installed (pip install sglang-router)")

    def command(port: int) -> list[str]:
        return [
            binary, "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
            "--policy", policy, "--health-check-endpoint", "/ready",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *flags,
        ]  # fmt: skip

    return command


def start_gateway(workers: list[str], policy: str, log_dir: Path, *flags: str) -> ServerProcess:
    gateway = ServerProcess(log_dir=log_dir, launcher=gateway_launcher(workers, policy, *flags), ready_path="/health")
    gateway.wait_ready(60)
    # NOTE: /health answers before the workers are registered (in the background): wait for all of them.
    deadline = time.monotonic() + 60
    while len(gateway_workers(gateway)) < len(workers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not register {workers}:\n{gateway.logs()}")
        time.sleep(0.1)
    return gateway


def gateway_workers(gateway: ServerProcess) -> list[dict]:
    """The workers the gateway has registered and holds healthy."""
    listed = httpx.get(f"{gateway.url}/workers", timeout=10).json()["workers"]
    return [w for w in listed if w["is_healthy"]]


def replica(log_dir: Path, threads: int) -> ServerProcess:
    env = {"OMP_NUM_THREADS": str(threads)}
    return ServerProcess("--log-level", "warning", log_dir=log_dir, env=env).wait_ready()


def summarize(label: str, runs: tuple[list[list], float], served: list[int]) -> str:
    convs, seconds = runs
    later = [t for c in convs for t in c[1:]]  # a first turn has nothing to reuse
    share = sum(t.cached for t in later) / max(1, sum(t.prompt for t in later))
    ttft = [t.ttft for c in convs for t in c]
    tokens = sum(t.tokens for c in convs for t in c)
    return (
        f"| {label} | {' / '.join(map(str, served))} | {share:.0%} | {percentile(ttft, 0.5):.3f} | "
        f"{percentile(ttft, 0.99):.3f} | {tokens / seconds:.1f} |"
    )


def hop_latency(url: str, requests: int) -> float:
    """p50 seconds of a one-token chat request, one at a time."""
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    seconds = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            seconds.append(time.perf_counter() - started)
    return percentile(seconds, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length per turn")
    parser.add_argument("--hop-requests", type=int, default=30, help="one-token requests per round of the hop measurement")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("gateway-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    stories = itertools.count(1000, 1000)  # each setup's conversations start at a story of their own

    def converse(url: str, turns: int) -> tuple[list[list], float]:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        return asyncio.run(conversations(url, args.conversations, turns, args.max_tokens, args.system_tokens, next(stories), model))

    def run(label: str, url: str, replicas: list[ServerProcess]) -> str:
        before = [r.outcomes() for r in replicas]
        runs = converse(url, args.turns)
        return summarize(label, runs, [sum((r.outcomes() - b).values()) for r, b in zip(replicas, before)])

    def warm(url: str) -> None:
        """Prefill and decode the shapes the runs will, once, so no setup pays a fresh process's first steps."""
        converse(url, 1)

    rows = []
    one = replica(args.out, cores)
    try:
        warm(one.url)
        rows.append(run(f"1 replica ({cores} threads), direct", one.url, [one]))
        gateway = start_gateway([one.url], "cache_aware", args.out, "--log-level", "warn")
        try:
            rows.append(run("gateway -> the same replica", gateway.url, [one]))
            hop = [hop_latency(url, args.hop_requests) for url in (one.url, gateway.url, one.url, gateway.url)]
        finally:
            gateway.terminate()
    finally:
        one.terminate()
    half = max(1, cores // 2)
    two = [replica(args.out, half) for _ in range(2)]
    try:
        for r in two:
            warm(r.url)
        for policy in POLICIES:
            gateway = start_gateway([r.url for r in two], policy, args.out, "--log-level", "warn")
            try:
                rows.append(run(f"gateway {policy} -> 2 replicas ({half} threads each)", gateway.url, two))
            finally:
                gateway.terminate()
    finally:
        for r in two:
            r.terminate()
    direct, through = min(hop[0], hop[2]), min(hop[1], hop[3])  # two rounds, alternating: the quieter of each
    report = "\n".join([
        f"# Behind the SGLang Model Gateway ({time.strftime('%Y-%m-%d %H:%M')}, {cores} cores)",
        "",
        f"`{vars(args)}`",
        "",
        f"{args.conversations} conversations x {args.turns} turns, each its own {args.system_tokens}-token system prompt, "
        f"{args.max_tokens} tokens per answer, all conversations at once.",
        "",
        "| setup | requests per replica | prompt tokens from cache (turns 2+) | TTFT p50 (s) | TTFT p99 (s) | output tok/s |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"The hop: a one-token chat request, one at a time, {args.hop_requests} per round, two rounds alternating: "
        f"p50 {direct * 1e3:.1f} ms direct, {through * 1e3:.1f} ms through the gateway (+{(through - direct) * 1e3:.1f} ms).",
    ]) + "\n"  # fmt: skip
    (args.out / "gateway.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
