"""Where one decode step's time goes: torch.profiler over `ModelRunner.decode`, the engine's own step.

    python -m bench.step_profile [--batch 1,32] [--quantization none] [--steps 8]

Prefills `batch` rows of 20 to 51 prompt tokens, warms up, then prints the wall time per step and the
operators by self CPU time. Figures are per machine and drift with its load: read them as shares.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from models import load
from models.runner import ModelRunner
from server.request import SamplingParams

TEXT = "The ferry crosses the bay every hour with cars, bicycles and commuters holding coffee. " * 12


@dataclass(eq=False)
class _Row:
    """The least a runner row needs: a prompt, its output so far, greedy parameters."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    beam: None = None  # not part of a beam search

    def suppressed_token_ids(self) -> Sequence[int]:
        return ()

    def allowed_tokens(self) -> None:  # no grammar
        return None


def profile(runner: ModelRunner[_Row], rows: list[_Row], steps: int) -> tuple[float, str]:
    def step() -> None:
        for row, sampled in zip(rows, runner.decode(), strict=True):
            row.output_ids.append(sampled.token)

    for row, sampled in zip(rows, runner.prefill(rows), strict=True):
        row.output_ids.append(sampled.token)
    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    return seconds, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    loaded = load(args.model, quantization=args.quantization)
    words = loaded.tokenizer.encode(TEXT)
    for batch in (int(b) for b in args.batch.split(",") if b):
        runner: ModelRunner[_Row] = ModelRunner(loaded.model, batch)
        rows = [_Row(words[i : i + 20 + i]) for i in range(batch)]
        seconds, table = profile(runner, rows, args.steps)
        print(f"{loaded.info.name}, {args.quantization}, batch {batch}: {seconds * 1e3:.1f} ms per step, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print(table)


if __name__ == "__main__":
    main()
