"""What scores cost: the same streaming load with and without `logprobs`, on one server, in one run.

    python -m bench.scores [--concurrency 32] [--requests 96] [--max-tokens 64] [--top 5] [--pairs 2]

One tokenferry server on the default model; levels alternate plain / scored, `pairs` times, so drift hits
both sides alike. Scored requests ask for each token's logprob and its `--top` most likely alternatives
(completions' `logprobs: k`, the same engine work as chat's `logprobs: true, top_logprobs: k`). Prints
tokens/s, TTFT and ITL per side and the ratio scored / plain (target: at least 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

from bench.process import ServerProcess
from bench.serve import Level, make_workload, run_level, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/reports/scores"))
    args = parser.parse_args()

    workload = make_workload(args.requests, args.max_tokens)
    sides = {"plain": None, f"logprobs {args.top}": {"logprobs": args.top}}
    levels: dict[str, list[Level]] = {label: [] for label in sides}
    args.out.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("--log-level", "warning", log_dir=args.out).wait_ready()
    try:
        asyncio.run(run_level(server.url, None, workload, 4, 8, "warm-up"))
        for _ in range(args.pairs):
            for label, fields in sides.items():
                level = asyncio.run(run_level(server.url, None, workload, args.concurrency, args.requests, label, fields))
                levels[label].append(level)
                print(f"  {label}: {level.tokens_per_s:.1f} tok/s, TTFT p50 {level.ttft(0.5):.3f} s, "
                      f"ITL p50 {level.itl(0.5):.3f} s p99 {level.itl(0.99):.3f} s, errors {level.errors}", flush=True)
    finally:
        server.terminate()

    plain, scored = (statistics.median(level.tokens_per_s for level in levels[label]) for label in sides)
    summary = (
        f"\nc={args.concurrency}, {args.max_tokens} new tokens, median of {args.pairs}: plain {plain:.1f} tok/s, "
        f"scored {scored:.1f} tok/s, ratio {scored / plain:.3f}\n"
    )
    path = write([level for runs in levels.values() for level in runs], args.out, "logprobs against none", summary)
    print(path.read_text())


if __name__ == "__main__":
    main()
