"""HTTP load generator for any OpenAI-compatible endpoint, streaming, by concurrency level.

    python -m bench.serve --url http://127.0.0.1:8000 --concurrency 1,8,32,64 --requests 96 --max-tokens 64 --out DIR

Each level keeps `concurrency` clients busy, each sending its next request as soon as its last one ends,
until `requests` have been sent. Per level it reports requests/s, output tokens/s, time to first token,
inter-token latency and end-to-end latency at p50/p90/p99, and errors; it writes a Markdown report and a
PNG plot (throughput and latency against concurrency) to the folder given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PASSAGE = (
    "The ferry left the harbor at dawn with a cargo of oranges, two bicycles, a piano bound for the island "
    "school and forty passengers who had all, for different reasons, decided that today was the day. The "
    "captain read the sky, the engineer read the gauges, and the cook read a novel about a shipwreck. "
)
PERCENTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    max_tokens: int


def make_workload(n: int, max_tokens: int, seed: int = 0, min_words: int = 6, max_words: int = 48) -> Workload:
    """Mixed prompt lengths (about 8 to 64 tokens), the same for every server measured."""
    rng = random.Random(seed)
    words = (PASSAGE * 20).split()
    prompts = []
    for _ in range(n):
        length = rng.randint(min_words, max_words)
        start = rng.randint(0, len(words) - length)
        prompts.append(" ".join(words[start : start + length]))
    return Workload(prompts, max_tokens)


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    error: str = ""


@dataclass
class Level:
    label: str
    concurrency: int
    seconds: float
    samples: list[Sample]

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return sum(s.output_tokens for s in self.ok) / self.seconds

    def ttft(self, q: float) -> float:
        return percentile([s.ttft for s in self.ok], q)

    def itl(self, q: float) -> float:
        return percentile([gap for s in self.ok for gap in s.itl], q)

    def e2e(self, q: float) -> float:
        return percentile([s.e2e for s in self.ok], q)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def completion_body(prompt: str) -> tuple[str, dict]:
    """A completion that runs to max_tokens (vLLM's ignore_eos), so every server makes the same count."""
    return "/v1/completions", {"prompt": prompt, "ignore_eos": True}


def chat_body(prompt: str) -> tuple[str, dict]:
    """One user turn, as a chat front end sends it. Only OpenAI's fields, which every peer accepts."""
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}


def _delta_text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def one_request(
    client: httpx.AsyncClient,
    model: str | None,
    prompt: str,
    max_tokens: int,
    fields: dict | None = None,
    shape: Callable[[str], tuple[str, dict]] = completion_body,
) -> Sample:
    route, body = shape(prompt)
    body |= {
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(fields or {}),
    }
    if model:
        body["model"] = model
    for attempt in (1, 2):
        sent = time.perf_counter()
        arrivals: list[float] = []
        usage_tokens = None
        answered = False
        try:
            async with client.stream("POST", route, json=body) as response:
                answered = True
                if response.status_code != 200:
                    return Sample(ok=False, error=f"HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Sample(ok=False, error=chunk["error"].get("message", "error"))
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"]["completion_tokens"]
                    if any(_delta_text(choice) for choice in chunk.get("choices") or []):
                        arrivals.append(time.perf_counter())
            break
        except httpx.RemoteProtocolError as exc:
            # A kept-alive connection the server closed as the request went out (llama-server does, now and then,
            # right after a stream): the request never reached it, so it is sent again once, as browsers do.
            if answered or attempt == 2:
                return Sample(ok=False, error=type(exc).__name__)
        except httpx.HTTPError as exc:
            return Sample(ok=False, error=type(exc).__name__)
    if not arrivals:
        return Sample(ok=False, error="no tokens")
    done = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Sample(ok=True, ttft=arrivals[0] - sent, itl=gaps, e2e=done - sent, output_tokens=usage_tokens or len(arrivals))


async def run_level(
    url: str,
    model: str | None,
    workload: Workload,
    concurrency: int,
    requests: int,
    label: str,
    fields: dict | None = None,
    shape: Callable[[str], tuple[str, dict]] = completion_body,
) -> Level:
    """`fields` are added to every request's body (logprobs, say); `shape` makes the route and body of a prompt."""
    queue = list(reversed(workload.prompts[:requests]))
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            samples.append(await one_request(client, model, queue.pop(), workload.max_tokens, fields, shape))

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Level(label=label, concurrency=concurrency, seconds=seconds, samples=samples)


def requests_for(concurrency: int, requested: int) -> int:
    """By default three waves of clients, so rows leave and newcomers join, and at least eight requests."""
    return requested or max(8, 3 * concurrency)


def report(levels: Sequence[Level], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| server | concurrency | requests | errors | req/s | output tok/s | TTFT p50 / p90 / p99 (s) | ITL p50 / p90 / p99 (s) | E2E p50 / p90 / p99 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def trio(f) -> str:
        return " / ".join(f"{f(q):.3f}" for q in PERCENTILES)

    for level in levels:
        lines.append(
            f"| {level.label} | {level.concurrency} | {len(level.samples)} | {level.errors} | {level.requests_per_s:.2f} | "
            f"{level.tokens_per_s:.1f} | {trio(level.ttft)} | {trio(level.itl)} | {trio(level.e2e)} |"
        )
    return "\n".join(lines) + "\n"


def plot(levels: Sequence[Level], path: Path, title: str) -> Path | None:
    """Throughput, and TTFT and ITL p50, against concurrency, one line per server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(level.label for level in levels):
        mine = sorted((l for l in levels if l.label == label), key=lambda l: l.concurrency)
        x = [l.concurrency for l in mine]
        throughput.plot(x, [l.tokens_per_s for l in mine], marker="o", label=label)
        latency.plot(x, [l.ttft(0.5) for l in mine], marker="o", label=f"{label} TTFT p50")
        latency.plot(x, [l.itl(0.5) for l in mine], marker="s", linestyle="--", label=f"{label} ITL p50")
    for axis, ylabel in ((throughput, "output tokens/s"), (latency, "seconds")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    latency.set_yscale("log")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write(levels: Sequence[Level], out: Path, title: str, extra: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    picture = plot(levels, out / "serve.png", title)
    text = report(levels, title) + ("\n![throughput and latency](serve.png)\n" if picture else "") + extra
    (out / "serve.md").write_text(text)
    return out / "serve.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL of an OpenAI-compatible server")
    parser.add_argument("--model", default=None, help="model id to send (default: none, the server's own)")
    parser.add_argument("--label", default="server")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 3 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workload = make_workload(max(requests_for(c, args.requests) for c in concurrencies), args.max_tokens)
    levels = []
    for concurrency in concurrencies:
        level = asyncio.run(
            run_level(args.url, args.model, workload, concurrency, requests_for(concurrency, args.requests), args.label)
        )
        levels.append(level)
        print(f"{args.label} c={concurrency}: {level.tokens_per_s:.1f} tok/s, TTFT p50 {level.ttft(0.5):.2f} s, "
              f"ITL p50 {level.itl(0.5):.3f} s, errors {level.errors}", flush=True)
    path = write(levels, args.out, f"{args.label} at {args.url}, {args.max_tokens} new tokens")
    print(path.read_text())


if __name__ == "__main__":
    main()
