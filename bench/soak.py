"""`make soak`: minutes of mixed streaming load on the default model; memory settles, every request accounted.

    python -m bench.soak [--minutes 10] [--clients 28] [--no-fill] [--out DIR]

The server runs with a small waiting queue so overload is part of the mix. Each client loops over a random
kind of request: a chat stream read to the end, a stream dropped after a few chunks, a plain completion,
an invalid body, a prompt over the context; an Anthropic message and a Responses answer (whole or
streamed, some calling a tool), a chat that offers tools, a beam search, a JSON schema, a long prompt. Every few seconds the server's resident memory is read from
/proc, the prefix cache's use and bound from /metrics, and /ready is checked.

The prefix cache grows toward its bound by design, and the running batch's KV storage follows the widest
window of the moment (long prompts beside 16 streams hold hundreds of MiB while they run), so memory is judged
net of what the server reports holding: RSS less `tokenferry_prefix_cache_bytes` and
`tokenferry_kv_store_bytes`. Before the load, distinct long prompts fill the cache
until it evicts, so the whole run sees it full and a leak cannot hide behind its filling (`--no-fill` skips
that). At the end every request the clients made is matched, by outcome, against the server's
`tokenferry_requests_total`, and the engine must track nothing. Exits 1 when a request is unaccounted for,
the server stopped being ready, the engine kept something, the cache held more than its bound, or memory
net of the cache kept growing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.process import ServerProcess, metric_total
from bench.serve import make_workload

SERVER_FLAGS = ("--log-level", "warning", "--max-batch-size", "16", "--max-waiting", "8")
SAMPLE_EVERY_S = 5.0
MIB = 2**20
KINDS = {  # kind: weight
    "stream": 35,
    "dropped": 10,
    "plain": 10,
    "invalid": 8,
    "too_long": 4,
    "messages": 8,
    "responses": 8,
    "tools": 6,
    "beam": 4,
    "schema": 4,
    "long": 3,
}
LONG_PROMPT_REPEATS = 12  # a workload prompt this many times over: a few thousand tokens, inside the context
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}
FORECAST = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"}},
            "required": ["city", "days"]}  # fmt: skip
DROP_AFTER_CHUNKS = (1, 6)
DROPPED_MAX_TOKENS = 256  # long enough that the drop always lands mid-generation
OVER_CONTEXT_WORDS = 12_000  # SmolLM2's context is 8192 tokens
FILL_NUMBERS = 500  # a filling prompt: this many random numbers, a few thousand tokens
FILL_CONCURRENCY = 4
CACHE_BYTES = "tokenferry_prefix_cache_bytes"
STORE_BYTES = "tokenferry_kv_store_bytes"
CACHE_CAPACITY = "tokenferry_prefix_cache_capacity_bytes"


@dataclass
class Tally:
    """What the clients saw, in the server's outcome labels."""

    outcomes: Counter = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    queue_full: int = 0  # of the rejected, how many were 429s

    def expect(self, ok: bool, outcome: str, detail: str) -> None:
        self.outcomes[outcome] += 1
        self.check(ok, detail)

    def check(self, ok: bool, detail: str) -> None:
        """A property of an answer already counted."""
        if not ok:
            self.wrong.append(detail)


@dataclass
class MemorySample:
    at_s: float
    rss_mib: float
    cache_mib: float  # what the prefix cache reports holding
    store_mib: float  # what the running batch's KV storage holds allocated
    ready: bool

    @property
    def net_mib(self) -> float:
        """Resident memory less the prefix cache's blocks and the batch's KV storage: what must not grow."""
        return self.rss_mib - self.cache_mib - self.store_mib


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def chat(prompt: str, **fields: object) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "temperature": 0.7, "seed": 1, **fields}


async def refused_or(response: httpx.Response, tally: Tally, kind: str) -> bool:
    """Count a 429 (overload, expected here) and back off as told; say whether the response was one."""
    if response.status_code != 429:
        return False
    await response.aread()
    retry_after = response.headers.get("retry-after", "")
    tally.queue_full += 1
    tally.expect(retry_after.isdigit(), "rejected", f"{kind}: 429 without Retry-After")
    await asyncio.sleep(int(retry_after) if retry_after.isdigit() else 1)
    return True


async def stream(client: httpx.AsyncClient, prompt: str, tally: Tally, rng: random.Random, drop: bool) -> None:
    kind = "dropped" if drop else "stream"
    max_tokens = DROPPED_MAX_TOKENS if drop else rng.randint(8, 64)
    body = chat(prompt, stream=True, max_tokens=max_tokens, ignore_eos=drop)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if await refused_or(response, tally, kind):
            return
        if response.status_code != 200:
            tally.expect(False, "error", f"{kind}: HTTP {response.status_code}")
            return
        chunks, finish, done = 0, None, False
        drop_at = rng.randint(*DROP_AFTER_CHUNKS) if drop else -1
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                tally.expect(False, "error", f"{kind}: {chunk['error']}")
                return
            chunks += 1
            if chunks == drop_at:
                tally.expect(True, "cancelled", kind)
                return  # leaving the block closes the connection mid-stream
            for choice in chunk["choices"]:
                finish = choice.get("finish_reason") or finish
    tally.expect(done and finish in ("stop", "length"), finish or "error", f"{kind}: finish {finish}, [DONE] {done}")


async def plain(client: httpx.AsyncClient, prompt: str, tally: Tally, rng: random.Random) -> None:
    response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": rng.randint(4, 32)})
    if await refused_or(response, tally, "plain"):
        return
    ok = response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finish = response.json()["choices"][0]["finish_reason"] if ok else "error"
    tally.expect(ok, finish, f"plain: HTTP {response.status_code}")


async def invalid(client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    bodies = [
        chat("hi", temperature=-1),
        chat("hi", max_tokens=0),
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": []},
        "{not json",
    ]
    body = rng.choice(bodies)
    if isinstance(body, str):
        response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = await client.post("/v1/chat/completions", json=body)
    shaped = "error" in response.json() and response.json()["error"]["type"] == "invalid_request_error"
    tally.expect(response.status_code == 400 and shaped, "rejected", f"invalid: HTTP {response.status_code}")


async def too_long(client: httpx.AsyncClient, tally: Tally) -> None:
    response = await client.post("/v1/completions", json={"prompt": "word " * OVER_CONTEXT_WORDS, "max_tokens": 8})
    code = response.json().get("error", {}).get("code")
    tally.expect(response.status_code == 400 and code == "context_length_exceeded", "rejected", f"too_long: HTTP {response.status_code}")


async def answered(client: httpx.AsyncClient, route: str, body: dict, tally: Tally, kind: str) -> dict | None:
    """A whole answer's JSON; None (counted) when it was refused or failed."""
    response = await client.post(route, json=body)
    if await refused_or(response, tally, kind):
        return None
    if response.status_code != 200:
        tally.expect(False, "error", f"{kind}: HTTP {response.status_code} {response.text[:200]}")
        return None
    return response.json()


async def events(client: httpx.AsyncClient, route: str, body: dict, tally: Tally, kind: str) -> list[dict] | None:
    """A streamed answer's events (Anthropic's and Responses' `event:`/`data:` frames), each its data."""
    async with client.stream("POST", route, json=body) as response:
        if await refused_or(response, tally, kind):
            return None
        if response.status_code != 200:
            tally.expect(False, "error", f"{kind}: HTTP {response.status_code}")
            return None
        return [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]


async def messages(client: httpx.AsyncClient, model: str, prompt: str, tally: Tally, rng: random.Random) -> None:
    """Anthropic's Messages API, whole or streamed, with a tool to call half the time."""
    body: dict = {"model": model, "max_tokens": rng.randint(8, 48), "messages": [{"role": "user", "content": prompt}]}
    if rng.random() < 0.5:
        tool = {"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}
        body |= {"tools": [tool], "tool_choice": {"type": rng.choice(["auto", "any"])}}
    if rng.random() < 0.5:
        answer = await answered(client, "/v1/messages", body, tally, "messages")
        reason = answer and answer["stop_reason"]
    else:
        frames = await events(client, "/v1/messages", body | {"stream": True}, tally, "messages")
        if frames is None:
            return
        ends = [f["delta"]["stop_reason"] for f in frames if f["type"] == "message_delta"]
        failed = [f for f in frames if f["type"] == "error"]
        reason = ends[0] if ends and frames[-1]["type"] == "message_stop" and not failed else None
        if reason is None:
            tally.expect(False, "error", f"messages: stream ended without message_stop: {failed[:1]}")
            return
    if reason is not None:
        tally.expect(True, "length" if reason == "max_tokens" else "stop", "messages")


async def responses(client: httpx.AsyncClient, prompt: str, tally: Tally, rng: random.Random) -> None:
    """OpenAI's Responses API, whole or streamed, with a function to call half the time."""
    body: dict = {"input": prompt, "max_output_tokens": rng.randint(8, 48)}
    if rng.random() < 0.5:
        body |= {"tools": [{"type": "function", **WEATHER}], "tool_choice": rng.choice(["auto", "required"])}
    if rng.random() < 0.5:
        answer = await answered(client, "/v1/responses", body, tally, "responses")
    else:
        frames = await events(client, "/v1/responses", body | {"stream": True}, tally, "responses")
        if frames is None:
            return
        last = frames[-1] if frames else {}
        answer = last.get("response") if last.get("type") == "response.completed" else None
        if answer is None:
            tally.expect(False, "error", f"responses: stream ended with {last.get('type')}")
            return
    if answer is not None:
        tally.expect(answer["status"] in ("completed", "incomplete"), "length" if answer["status"] == "incomplete" else "stop", "responses")


async def chat_answer(client: httpx.AsyncClient, route: str, body: dict, tally: Tally, kind: str) -> dict | None:
    """A whole chat or completion answer's first choice, counted by its finish reason (a call is a stop)."""
    answer = await answered(client, route, body, tally, kind)
    if answer is None:
        return None
    choice = answer["choices"][0]
    finish = {"tool_calls": "stop"}.get(choice["finish_reason"], choice["finish_reason"])
    tally.expect(finish in ("stop", "length"), finish, f"{kind}: finish {choice['finish_reason']}")
    return choice


async def other(client: httpx.AsyncClient, kind: str, prompt: str, tally: Tally, rng: random.Random) -> None:
    """The chat features agents and apps combine: tools, beam search, a JSON schema, a long prompt."""
    if kind == "tools":
        body = chat(prompt, max_tokens=48, tools=[{"type": "function", "function": WEATHER}], tool_choice=rng.choice(["auto", "required"]))
        await chat_answer(client, "/v1/chat/completions", body, tally, kind)
    elif kind == "beam":
        body = {"prompt": prompt, "max_tokens": 16, "use_beam_search": True, "n": 2, "temperature": 0}
        await chat_answer(client, "/v1/completions", body, tally, kind)
    elif kind == "schema":
        schema = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}
        choice = await chat_answer(client, "/v1/chat/completions", chat(prompt, max_tokens=64, response_format=schema), tally, kind)
        if choice is not None and choice["finish_reason"] == "stop":
            tally.check(_is_object(choice["message"]["content"]), f"schema: not a JSON object: {choice['message']['content'][:80]!r}")
    else:
        await chat_answer(client, "/v1/chat/completions", chat(prompt * LONG_PROMPT_REPEATS, max_tokens=8), tally, kind)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


async def client_loop(url: str, deadline: float, prompts: list[str], tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            prompt = rng.choice(prompts)
            try:
                if kind in ("stream", "dropped"):
                    await stream(client, prompt, tally, rng, drop=kind == "dropped")
                elif kind == "plain":
                    await plain(client, prompt, tally, rng)
                elif kind == "invalid":
                    await invalid(client, tally, rng)
                elif kind == "too_long":
                    await too_long(client, tally)
                elif kind == "messages":
                    await messages(client, model, prompt, tally, rng)
                elif kind == "responses":
                    await responses(client, prompt, tally, rng)
                else:
                    await other(client, kind, prompt, tally, rng)
            except httpx.HTTPError as exc:  # a transport failure is the server's fault here: count it
                tally.expect(False, "error", f"{kind}: {type(exc).__name__}")


async def scrape(client: httpx.AsyncClient, *names: str) -> list[float]:
    text = (await client.get("/metrics")).text
    return [metric_total(text, name) for name in names]


async def fill_cache(url: str, seed: int = 99) -> tuple[int, float]:
    """Send distinct long prompts until the prefix cache evicts: it is full. Returns (prompts, seconds)."""
    rng = random.Random(seed)
    started, sent = time.monotonic(), 0
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        while not (await scrape(client, "tokenferry_prefix_cache_evictions_total"))[0]:
            prompts = [" ".join(str(rng.randrange(10**6)) for _ in range(FILL_NUMBERS)) for _ in range(FILL_CONCURRENCY)]
            bodies = [{"prompt": p, "max_tokens": 1} for p in prompts]
            answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            if any(a.status_code != 200 for a in answers):
                raise RuntimeError(f"filling the prefix cache: HTTP {[a.status_code for a in answers]}")
            sent += len(bodies)
    return sent, time.monotonic() - started


async def sample_memory(server: ServerProcess, deadline: float, started: float, samples: list[MemorySample]) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        while True:
            ready = (await client.get("/ready")).status_code == 200
            cache_bytes, store_bytes = await scrape(client, CACHE_BYTES, STORE_BYTES)
            rss = rss_mib(server.process.pid)
            samples.append(MemorySample(time.monotonic() - started, rss, cache_bytes / MIB, store_bytes / MIB, ready))
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(SAMPLE_EVERY_S)


async def load(server: ServerProcess, minutes: float, clients: int) -> tuple[Tally, list[MemorySample]]:
    tally, samples = Tally(), []
    prompts = make_workload(200, 0, seed=7).prompts
    started = time.monotonic()
    deadline = started + minutes * 60
    await asyncio.gather(
        sample_memory(server, deadline, started, samples),
        *(client_loop(server.url, deadline, prompts, tally, seed) for seed in range(clients)),
    )
    return tally, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=28, help="a little over the server's 16 rows + 8 waiting")
    parser.add_argument("--max-growth-mib", type=float, default=64, help="fail if the second half's peak net RSS exceeds the first half's by more")
    parser.add_argument("--no-fill", dest="fill", action="store_false", help="start the load with an empty prefix cache")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("soak-%Y%m%d-%H%M%S"))
    args = parser.parse_args()

    server = ServerProcess(*SERVER_FLAGS, log_dir=args.out / "logs").wait_ready()
    try:
        loaded_rss = rss_mib(server.process.pid)
        capacity_mib = server.metric(CACHE_CAPACITY) / MIB
        print(f"soak: {args.minutes} min, {args.clients} clients, server {' '.join(SERVER_FLAGS)}; RSS after load {loaded_rss:.0f} MiB, "
              f"prefix cache bound {capacity_mib:.0f} MiB", flush=True)  # fmt: skip
        fill = ""
        if args.fill:
            prompts, seconds = asyncio.run(fill_cache(server.url))
            fill = f"filled with {prompts} prompts in {seconds:.0f} s to {server.metric(CACHE_BYTES) / MIB:.0f} MiB; RSS {rss_mib(server.process.pid):.0f} MiB"
            print(f"prefix cache {fill}", flush=True)
        before = server.outcomes()
        tally, samples = asyncio.run(load(server, args.minutes, args.clients))
        tracked = server.settle()
        counted = server.counted_since(before, sum(tally.outcomes.values()))
        end_rss = rss_mib(server.process.pid)
    finally:
        server.terminate()

    half = len(samples) // 2
    first_peak = max(s.net_mib for s in samples[:half] or samples)
    second_peak = max(s.net_mib for s in samples[half:])
    peak_rss = max(s.rss_mib for s in samples)
    cache_peak = max(s.cache_mib for s in samples)
    store_peak = max(s.store_mib for s in samples)
    not_ready = sum(not s.ready for s in samples)
    problems = list(dict.fromkeys(tally.wrong))[:20]
    if tally.outcomes != counted:
        problems.append(f"client saw {dict(tally.outcomes)}, server counted {dict(counted)}")
    if any(tracked.values()):
        problems.append(f"engine still tracks {tracked}")
    if not_ready:
        problems.append(f"/ready failed in {not_ready} of {len(samples)} samples")
    if cache_peak > capacity_mib:
        problems.append(f"the prefix cache held {cache_peak:.0f} MiB, over its bound of {capacity_mib:.0f} MiB")
    if second_peak - first_peak > args.max_growth_mib:
        problems.append(f"RSS net of the prefix cache and the KV store kept growing: peak {first_peak:.0f} MiB in the first half, {second_peak:.0f} MiB in the second")

    total = sum(tally.outcomes.values())
    report = "\n".join([
        f"# Soak: {args.minutes} min, {args.clients} clients",
        "",
        f"Server flags: `{' '.join(SERVER_FLAGS)}`; prefix cache bound {capacity_mib:.0f} MiB, "
        + (f"{fill} before the load." if fill else "empty at the start."),
        "",
        "| requests | by outcome (client = server) | RSS after load | peak RSS | peak cache | peak KV store | net peak 1st half | net peak 2nd half | end RSS | not ready |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {total} | {dict(sorted(tally.outcomes.items()))} (429s: {tally.queue_full}) | {loaded_rss:.0f} MiB | {peak_rss:.0f} MiB | "
        f"{cache_peak:.0f} MiB | {store_peak:.0f} MiB | {first_peak:.0f} MiB | {second_peak:.0f} MiB | {end_rss:.0f} MiB | {not_ready} |",
        "",
        "Samples (s: RSS / cache / KV store MiB): "
        + ", ".join(f"{s.at_s:.0f}: {s.rss_mib:.0f}/{s.cache_mib:.0f}/{s.store_mib:.0f}" for s in samples),
        "",
        ("Problems:\n" + "\n".join(f"- {p}" for p in problems)) if problems else "Every request accounted for; nothing left in the engine.",
        "",
    ])  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(report)
    print(report, flush=True)
    print(f"peak RSS {peak_rss:.0f} MiB; report in {args.out / 'soak.md'}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
