"""`make bench`, first part: tokenferry beside itself without batching on the same workload, in one run;
then the engine alone on the same prompts. Prints the ratios. (The peers, llama.cpp and transformers'
server, are the second part: bench/peers.py.)

    python -m bench.run [--concurrency 1,8,32,64] [--baseline-concurrency 1,32] [--max-tokens 64] [--pairs 3]

- no batching: tokenferry with --max-batch-size 1, the same code serving one request at a time;
- engine: tokenferry's engine driven in-process, without HTTP, at the concurrency of the comparison, so
  the HTTP and SSE overhead is the difference; measured in pairs back to back with the server, because
  this machine's speed drifts more over minutes than the overhead being measured;
- prefill: the server's own mean prefill step at concurrency 1, against which time to first token is read.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch

from bench.engine import Job, run_engine
from bench.process import ServerProcess, metric_total
from bench.serve import Level, Workload, make_workload, requests_for, run_level, write
from models import LoadedModel, load
from server.prompt import encode_completion
from server.scheduler import Budgets


def prefill_seconds(server: ServerProcess) -> tuple[float, float]:
    """(sum, count) of the server's prefill step histogram."""
    text = server.metrics()
    name = "tokenferry_step_duration_seconds"
    return metric_total(text, f"{name}_sum", phase="prefill"), metric_total(text, f"{name}_count", phase="prefill")


def measure(server: ServerProcess, label: str, workload: Workload, concurrencies: list[int], requests: int, model: str | None) -> tuple[list[Level], float | None]:
    """Every level against one server; also the mean prefill time at concurrency 1 when it is tokenferry."""
    levels, prefill = [], None
    for concurrency in concurrencies:
        before = prefill_seconds(server) if label.startswith("tokenferry") else None
        level = asyncio.run(run_level(server.url, model, workload, concurrency, requests_for(concurrency, requests), label))
        if before is not None and concurrency == 1:
            after = prefill_seconds(server)
            prefill = (after[0] - before[0]) / max(1.0, after[1] - before[1])
        levels.append(level)
        print(f"  {label} c={concurrency}: {level.tokens_per_s:.1f} tok/s, TTFT p50 {level.ttft(0.5):.3f} s, "
              f"ITL p50 {level.itl(0.5):.3f} s, errors {level.errors}", flush=True)
    return levels, prefill


def engine_level(loaded: LoadedModel, workload: Workload, concurrency: int, requests: int) -> float:
    """tokens/s of the engine alone on the same prompts (tokenized as the server would)."""
    jobs = [Job(encode_completion(loaded.tokenizer, p), workload.max_tokens) for p in workload.prompts[:requests]]
    budgets = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=4096, max_waiting=len(jobs))
    return run_engine(loaded, jobs, concurrency, budgets).tokens_per_s


def http_over_engine(server: ServerProcess, workload: Workload, concurrency: int, requests: int, pairs: int) -> list[tuple[float, float]]:
    """(HTTP, engine alone) tokens/s, measured back to back `pairs` times.

    This machine's speed drifts by 20% over minutes, more than the overhead being measured, so each
    HTTP figure is read beside an engine figure taken right after it; the server idles meanwhile.
    """
    loaded = load("default")
    measured = []
    for _ in range(pairs):
        http = asyncio.run(run_level(server.url, None, workload, concurrency, requests, "tokenferry")).tokens_per_s
        measured.append((http, engine_level(loaded, workload, concurrency, requests)))
        print(f"  HTTP / engine alone at c={concurrency}: {measured[-1][0]:.1f} / {measured[-1][1]:.1f} tok/s", flush=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--baseline-concurrency", default="1,32", help="levels for the server without batching (slow)")
    parser.add_argument("--compare-at", type=int, default=32, help="the level the targets are read at")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 3 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3, help="HTTP / engine-alone measurements, back to back")
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("serve-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    baseline_levels = [int(c) for c in args.baseline_concurrency.split(",")]
    compare = args.compare_at
    workload = make_workload(max(requests_for(c, args.requests) for c in concurrencies), args.max_tokens)
    logs = args.out / "logs"
    print(f"{len(workload.prompts)} prompts, {args.max_tokens} new tokens, {torch.get_num_threads()} threads; reports in {args.out}", flush=True)

    levels: list[Level] = []
    server = ServerProcess("--log-level", "warning", log_dir=logs).wait_ready()
    try:
        levels, prefill = measure(server, "tokenferry", workload, concurrencies, args.requests, None)
        pairs = http_over_engine(server, workload, compare, requests_for(compare, args.requests), args.pairs)
    finally:
        server.terminate()
    server = ServerProcess("--log-level", "warning", "--max-batch-size", "1", log_dir=logs).wait_ready()
    try:
        levels += measure(server, "no batching", workload, baseline_levels, args.requests, None)[0]
    finally:
        server.terminate()

    def at(label: str, concurrency: int) -> Level | None:
        return next((l for l in levels if l.label == label and l.concurrency == concurrency), None)

    ours, flat = at("tokenferry", compare), at("no batching", compare)
    single = at("tokenferry", 1)
    lines = ["", "## Ratios", "", "| measure | value | target |", "| --- | --- | --- |"]
    if ours and flat:
        lines.append(f"| output tok/s at {compare} streams, tokenferry / no batching | {ours.tokens_per_s / flat.tokens_per_s:.2f}x | >= 6x |")
    if pairs:
        ratios = sorted(http / engine for http, engine in pairs)
        each = ", ".join(f"{http:.0f}/{engine:.0f}" for http, engine in pairs)
        lines.append(f"| output tok/s at {compare} streams, HTTP / engine alone (median of {len(pairs)} back-to-back pairs: {each}) | {statistics.median(ratios):.2f} | >= 0.90 |")
    if single and prefill:
        mean_ttft = sum(s.ttft for s in single.ok) / len(single.ok)
        lines.append(f"| TTFT at 1 stream / prefill step (means: {mean_ttft:.3f} s / {prefill:.3f} s) | {mean_ttft / prefill:.2f} | <= 1.20 |")
    ratios = "\n".join(lines) + "\n"
    path = write(levels, args.out, f"tokenferry HTTP benchmark, {args.max_tokens} new tokens", ratios)
    print(path.read_text())


if __name__ == "__main__":
    main()
