"""Structured output's cost: concurrent streams constrained by a JSON schema against the same streams free,
on one server, in back-to-back pairs; and the grammar mask's cost per token.

    python -m bench.structured [--concurrency 32] [--pairs 3] [--max-tokens 64] [--out DIR]

Both sides send the same prompts through bench.serve's load generator, with ignore_eos and max_tokens, and
the schema asks for a list of at least 40 items, so a constrained stream also runs to max_tokens: both
sides make the same number of tokens and only the grammar differs. This machine's speed drifts by 20%
over minutes, more than the cost being measured, so the sides alternate and the ratio is the median of
the pairs. The mask's cost is read from the server's own metrics (computing a row's bitmask, per token)
and timed here for the other half (unpacking and applying a batch of bitmasks to the logits).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.process import ServerProcess
from bench.serve import Level, make_workload, requests_for, run_level, write
from models.grammar import apply_masks

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 500},
                    "fragile": {"type": "boolean"},
                },
                "required": ["name", "quantity", "fragile"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "cargo", "schema": SCHEMA}}}
MASK = "tokenferry_grammar_mask_seconds"
STEP = "tokenferry_step_duration_seconds"


def counters(server: ServerProcess) -> dict[str, float]:
    return {
        "mask_s": server.metric(f"{MASK}_sum"),
        "masks": server.metric(f"{MASK}_count"),
        "decode_s": server.metric(f"{STEP}_sum", phase="decode"),
        "decodes": server.metric(f"{STEP}_count", phase="decode"),
    }


def apply_cost(rows: int, vocab: int, repeats: int = 50) -> float:
    """Seconds to unpack and apply `rows` bitmasks to [rows, vocab] logits, as the sampler does per step."""

    class Row:
        def __init__(self, mask: np.ndarray) -> None:
            self.mask = mask

        def allowed_tokens(self) -> np.ndarray:
            return self.mask

    rng = np.random.default_rng(0)
    masks = [Row(rng.integers(-(2**31), 2**31, (vocab + 31) // 32, dtype=np.int64).astype(np.int32)) for _ in range(rows)]
    logits = torch.randn(rows, vocab)
    apply_masks(logits.clone(), masks)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        apply_masks(logits.clone(), masks)
    clone = time.perf_counter()
    for _ in range(repeats):
        logits.clone()
    return ((clone - started) - (time.perf_counter() - clone)) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=0, help="requests per measurement (default: 3 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/reports") / time.strftime("structured-%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    requests = requests_for(args.concurrency, args.requests)
    workload = make_workload(requests, args.max_tokens)
    print(f"{requests} requests per side at {args.concurrency} streams, {args.max_tokens} new tokens, "
          f"{torch.get_num_threads()} threads; reports in {args.out}", flush=True)  # fmt: skip

    levels: list[Level] = []
    pairs: list[tuple[float, float]] = []
    spent = {"free": dict.fromkeys(("mask_s", "masks", "decode_s", "decodes"), 0.0)}
    spent["schema"] = dict(spent["free"])
    server = ServerProcess("--log-level", "warning", log_dir=args.out / "logs").wait_ready()
    try:
        # Warm-up: the first constrained request builds the tokenizer's trie and compiles the schema.
        asyncio.run(run_level(server.url, None, workload, 2, 2, "warm-up", RESPONSE_FORMAT))
        for _ in range(args.pairs):
            measured = {}
            for label, extra in (("free", None), ("schema", RESPONSE_FORMAT)):
                before = counters(server)
                level = asyncio.run(run_level(server.url, None, workload, args.concurrency, requests, label, extra))
                after = counters(server)
                for key in after:
                    spent[label][key] += after[key] - before[key]
                assert level.errors == 0, [s.error for s in level.samples if not s.ok][:3]
                levels.append(level)
                measured[label] = level.tokens_per_s
                print(f"  {label}: {level.tokens_per_s:.1f} tok/s, ITL p50 {level.itl(0.5):.3f} s", flush=True)
            pairs.append((measured["schema"], measured["free"]))
    finally:
        server.terminate()

    ratios = sorted(schema / free for schema, free in pairs)
    each = ", ".join(f"{schema:.0f}/{free:.0f}" for schema, free in pairs)
    constrained = spent["schema"]
    mask_us = 1e6 * constrained["mask_s"] / max(1.0, constrained["masks"])
    step = {label: s["decode_s"] / max(1.0, s["decodes"]) for label, s in spent.items()}
    vocab = 49152
    apply_us = 1e6 * apply_cost(args.concurrency, vocab) / args.concurrency
    lines = [
        "", "## Structured output", "",
        "| measure | value | target |", "| --- | --- | --- |",
        f"| output tok/s at {args.concurrency} streams, JSON schema / free (median of {len(pairs)} back-to-back pairs: {each}) | {statistics.median(ratios):.2f} | >= 0.85 |",
        f"| computing one row's mask (llguidance), per constrained token, mean of {int(constrained['masks'])} | {mask_us:.0f} us | |",
        f"| unpacking and applying the masks, per constrained token (batch of {args.concurrency}, vocabulary {vocab}) | {apply_us:.0f} us | |",
        f"| mean decode step, JSON schema / free | {step['schema'] * 1e3:.0f} / {step['free'] * 1e3:.0f} ms | |",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    path = write(levels, args.out, f"tokenferry structured output, {args.concurrency} streams, {args.max_tokens} new tokens", text)
    print(path.read_text())


if __name__ == "__main__":
    main()
