"""Long conversations: the prefix cache on and off, and chunked against unchunked prefill, in one run.

    python -m bench.prefix --conversations 16 --turns 8 --system-tokens 500 --out DIR

1. Multi-turn chat: `conversations` clients each hold a conversation of `turns` turns behind one shared
   system prompt, sending the whole history every turn as a chat front end does, against a server with
   the prefix cache and one started with `--prefix-cache-bytes 0`. Reports time to first token p50 / p99
   per turn and output tokens/s.
2. Long prompts joining: `streams` streams decode while `long_prompts` prompts of `long_tokens` tokens join
   one after another, against `--max-prefill-tokens CHUNK` and an unchunked server (a budget larger than
   any prompt), `chunk_runs` times, alternating. Reports the streams' inter-token latency p50 / p99 and the
   long prompts' prefill tokens/s (prompt tokens over time to first token) per run, and the medians. A long
   prompt asks for `long_answer` tokens: with 1 it ends at its first token and never enters the decoding
   batch; with more it joins the streams.
3. A burst: `burst` short chat requests arriving together, with the chunked budget, with 4096 prompt tokens
   per step (the old default), and against `transformers serve --continuous-batching` (bench/peers.py's
   launcher, on the same converted model): time to first token p50 / p99 (first tokens leave after each
   group). One server runs at a time.
Each server is a real process on the default model; the figures are wall-clock and drift with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx

from bench.peers import start, transformers_launcher
from bench.process import ServerProcess
from bench.serve import PASSAGE, chat_body, make_workload, percentile, run_level
from models.loader import converted_gguf, default_gguf

WORDS = (PASSAGE * 200).split()
QUESTIONS = [
    "What was in the cargo?", "Who read the sky?", "Why did the passengers travel today?", "Where was the piano going?",
    "Describe the engineer.", "What novel did the cook read?", "When did the ferry leave?", "What could go wrong?",
]  # fmt: skip


@dataclass
class Turn:
    ttft: float
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    cached: int = 0
    prompt: int = 0


def words(count: int, seed: int) -> str:
    start = random.Random(seed).randint(0, len(WORDS) - count - 1)
    return " ".join(WORDS[start : start + count])


async def stream_chat(client: httpx.AsyncClient, body: dict) -> tuple[str, Turn]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    sent = time.perf_counter()
    arrivals, text, usage = [], [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if content := choice["delta"].get("content"):
                    arrivals.append(time.perf_counter())
                    text.append(content)
    turn = Turn(ttft=arrivals[0] - sent, itl=[b - a for a, b in pairwise(arrivals)])
    turn.tokens = usage.get("completion_tokens", len(arrivals))
    turn.cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    turn.prompt = usage.get("prompt_tokens", 0)
    return "".join(text), turn


async def conversations(
    url: str, count: int, turns: int, max_tokens: int, system_tokens: int, seed: int | None = None, model: str | None = None
) -> tuple[list[list[Turn]], float]:
    """`count` conversations at once, `turns` turns each; the turns of each conversation, and the seconds.

    All share one system prompt, or, with `seed`, each has its own (story `seed + index`). `model` is sent
    when given (a gateway routes by it)."""

    def system(index: int) -> str:
        story = 0 if seed is None else seed + index
        return "You are a patient guide. Here is the story you know: " + words(system_tokens * 3 // 4, story)

    async def one(index: int) -> list[Turn]:
        messages = [{"role": "system", "content": system(index)}]
        measured = []
        for turn in range(turns):
            messages.append({"role": "user", "content": f"{QUESTIONS[(index + turn) % len(QUESTIONS)]} ({index})"})
            body = {"messages": messages, "max_tokens": max_tokens, "ignore_eos": True, **({"model": model} if model else {})}
            text, answer = await stream_chat(client, body)
            messages.append({"role": "assistant", "content": text})
            measured.append(answer)
        return measured

    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(count)))
        return results, time.perf_counter() - started


async def long_prompts_joining(url: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """The streams' inter-token gaps, and each long prompt's prefill tokens/s."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0)) as client:

        async def stream() -> list[float]:
            body = {"messages": [{"role": "user", "content": words(20, 1)}], "max_tokens": args.stream_tokens, "ignore_eos": True}
            return (await stream_chat(client, body))[1].itl

        streams = [asyncio.create_task(stream()) for _ in range(args.streams)]
        await asyncio.sleep(2.0)  # the streams are decoding
        rates = []
        for i in range(args.long_prompts):
            # Each long prompt is new text, so the prefix cache has none of it (about 1.2 tokens a word).
            body = {"messages": [{"role": "user", "content": words(args.long_tokens * 5 // 6, 100 + i)}], "max_tokens": args.long_answer}
            _, turn = await stream_chat(client, body)
            rates.append(turn.prompt / turn.ttft)
        gaps = [gap for task in streams for gap in await task]
        return gaps, rates


def serve(log_dir: Path, *flags: str) -> ServerProcess:
    return ServerProcess("--log-level", "warning", *flags, log_dir=log_dir).wait_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length per turn")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=96)
    parser.add_argument("--long-prompts", type=int, default=2)
    parser.add_argument("--long-tokens", type=int, default=1500)
    parser.add_argument("--long-answer", type=int, default=1, help="tokens each long prompt asks for (1: it never joins the decoding rows)")
    parser.add_argument("--chunk", type=int, default=256, help="--max-prefill-tokens of the chunked server")
    parser.add_argument("--chunk-runs", type=int, default=3, help="chunked and unchunked runs of part 2, alternating")
    parser.add_argument("--burst", type=int, default=32, help="requests arriving together")
    parser.add_argument("--skip", choices=("chat", "chunks", "burst"), action="append", default=[], help="leave a part out (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("prefix-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Long conversations ({time.strftime('%Y-%m-%d %H:%M')})", "", f"`{vars(args)}`", ""]

    if "chat" not in args.skip:
        runs = {}
        for label, flags in (("cache", ()), ("no cache", ("--prefix-cache-bytes", "0"))):
            server = serve(args.out, *flags)
            try:
                runs[label] = asyncio.run(
                    conversations(server.url, args.conversations, args.turns, args.max_tokens, args.system_tokens)
                )
            finally:
                server.terminate()
        lines += [
            f"## {args.conversations} conversations x {args.turns} turns, {args.system_tokens}-token system prompt",
            "",
            "| turn | TTFT p50 cache / none (s) | TTFT p99 cache / none (s) | p50 speed-up | cached tokens (mean) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for turn in range(args.turns):
            on = [c[turn] for c in runs["cache"][0]]
            off = [c[turn] for c in runs["no cache"][0]]
            p50 = (percentile([t.ttft for t in on], 0.5), percentile([t.ttft for t in off], 0.5))
            p99 = (percentile([t.ttft for t in on], 0.99), percentile([t.ttft for t in off], 0.99))
            cached = sum(t.cached for t in on) / len(on)
            lines.append(
                f"| {turn + 1} | {p50[0]:.2f} / {p50[1]:.2f} | {p99[0]:.2f} / {p99[1]:.2f} | {p50[1] / p50[0]:.1f}x | {cached:.0f} |"
            )
        for label, (convs, seconds) in runs.items():
            tokens = sum(t.tokens for c in convs for t in c)
            lines.append(f"\n{label}: {tokens} output tokens in {seconds:.1f} s, {tokens / seconds:.1f} tok/s")
        lines.append("")

    if "chunks" not in args.skip:
        lines += [
            f"## {args.streams} streams while {args.long_prompts} prompts of {args.long_tokens} tokens join ({args.long_answer} new tokens each)",
            "",
            "| run | server | stream ITL p50 (s) | stream ITL p99 (s) | long prompt prefill tok/s |",
            "| --- | --- | --- | --- | --- |",
        ]
        p99s: dict[str, list[float]] = {}
        ratios = []  # chunked prefill tok/s over unchunked, within one run
        for run in range(1, args.chunk_runs + 1):  # alternating, so that machine drift hits both alike
            rates = {}
            for label, chunk in ((f"chunked ({args.chunk})", args.chunk), ("unchunked", 1_000_000)):
                server = serve(args.out, "--max-prefill-tokens", str(chunk), "--prefix-cache-bytes", "0")
                try:
                    gaps, prefill = asyncio.run(long_prompts_joining(server.url, args))
                finally:
                    server.terminate()
                rates[label] = sum(prefill) / len(prefill)
                p99s.setdefault(label, []).append(percentile(gaps, 0.99))
                lines.append(f"| {run} | {label} | {percentile(gaps, 0.5):.3f} | {p99s[label][-1]:.3f} | {rates[label]:.0f} |")
            ratios.append(rates[f"chunked ({args.chunk})"] / rates["unchunked"])
        for label, values in p99s.items():
            lines.append(f"\n{label}: ITL p99 median {statistics.median(values):.3f} s (runs: {', '.join(f'{v:.3f}' for v in values)})")
        lines.append(
            f"\nprefill tok/s chunked / unchunked: median {statistics.median(ratios):.0%} "
            f"(runs: {', '.join(f'{r:.0%}' for r in ratios)})"
        )
        lines.append("")

    if "burst" not in args.skip:
        lines += [
            f"## {args.burst} chat requests arriving together ({args.max_tokens} new tokens each)",
            "",
            "| server | TTFT p50 (s) | TTFT p99 (s) | output tok/s |",
            "| --- | --- | --- | --- |",
        ]
        workload = make_workload(args.burst, args.max_tokens)
        folder = converted_gguf(default_gguf())
        # label: (flags, options) of bench.peers.start
        launches: dict[str, tuple[tuple[str, ...], dict]] = {
            f"tokenferry --max-prefill-tokens {chunk}": (
                ("--log-level", "warning", "--max-prefill-tokens", str(chunk), "--prefix-cache-bytes", "0"), {}
            )
            for chunk in (args.chunk, 4096)
        }
        launches["transformers serve --continuous-batching"] = (
            (), {"launcher": transformers_launcher(folder), "ready_path": "/health", "model": str(folder)}
        )
        ttft = {}
        for label, (flags, options) in launches.items():
            peer = start(label, args.out, *flags, **options)  # started, warmed, paused: one server runs at a time
            if peer is None:
                continue
            peer.resume()
            try:
                level = asyncio.run(run_level(peer.server.url, peer.model, workload, args.burst, args.burst, label, shape=chat_body))
            finally:
                peer.server.terminate()
            ttft[label] = level.ttft(0.5)
            lines.append(f"| {label} | {level.ttft(0.5):.2f} | {level.ttft(0.99):.2f} | {level.tokens_per_s:.1f} |")
        ours, theirs = ttft.get(f"tokenferry --max-prefill-tokens {args.chunk}"), ttft.get("transformers serve --continuous-batching")
        if ours and theirs:
            lines.append(f"\nTTFT p50, transformers serve / tokenferry (chunk {args.chunk}): {theirs / ours:.2f}x")
    report = "\n".join(lines) + "\n"
    (args.out / "prefix.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
