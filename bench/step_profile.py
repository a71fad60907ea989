"""Where one decode step's time goes: torch.profiler over `ModelRunner.decode`, the engine's own step.

    python -m bench.step_profile [--batch 1,32] [--dtype auto] [--quantization none] [--steps 8] [--against-transformers]

Prefills `batch` rows of 20 to 51 prompt tokens, warms up, then prints the wall time per step and the
operators by self CPU time. Figures are per machine and drift with its load: read them as shares.

At one row it also measures what the step is bound by: the bytes of weights a step reads (every buffer and
parameter but the embedding table, which a step only indexes) and the time this machine takes to stream as
many bytes (`torch.sum`), in rounds alternating with the steps so that the machine's drift hits both alike.

`--against-transformers`: also loads the model with its projections apart, which transformers' forward runs
instead of models/decoder.py's, and times the two in alternating rounds, each over its own copy of the same
rows; prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
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


class _Stepper:
    """`batch` rows prefilled in a runner of their own, then decoded a step at a time."""

    def __init__(self, model: torch.nn.Module, words: list[int], batch: int) -> None:
        self.runner: ModelRunner[_Row] = ModelRunner(model, batch)
        self.rows = [_Row(words[i : i + 20 + i]) for i in range(batch)]
        for row, sampled in zip(self.rows, self.runner.prefill(self.rows), strict=True):
            row.output_ids.append(sampled.token)
        self.seconds_per_step(3)  # warm up

    def step(self) -> None:
        for row, sampled in zip(self.rows, self.runner.decode(), strict=True):
            row.output_ids.append(sampled.token)

    def seconds_per_step(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - started) / steps

    def table(self, steps: int) -> str:
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                self.step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def _against_bandwidth(model: torch.nn.Module, stepper: _Stepper, steps: int, rounds: int) -> None:
    """Print the one-row step against the time to stream the weights it reads, measured in alternating rounds."""
    embedding = model.get_input_embeddings().weight
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not embedding}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    block = torch.ones(weights // 4)  # float32: as many bytes
    floors, steps_seconds = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(5):
            block.sum()
        floors.append((time.perf_counter() - started) / 5)
        steps_seconds.append(stepper.seconds_per_step(steps))
    floor, step = statistics.median(floors), statistics.median(steps_seconds)
    print(f"  {weights / 1e6:.0f} MB of weights; torch.sum streams them at {weights / floor / 1e9:.1f} GB/s in "
          f"{floor * 1e3:.1f} ms; the step takes {step * 1e3:.1f} ms: {step / floor:.2f}x (medians of {rounds} "
          f"alternating rounds)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--against-transformers", action="store_true", help="time transformers' forward too")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (--against-transformers, the bandwidth)")
    args = parser.parse_args()
    loaded = load(args.model, dtype=args.dtype, quantization=args.quantization)
    apart = load(args.model, dtype=args.dtype, quantization=args.quantization, fuse=False) if args.against_transformers else None
    words = loaded.tokenizer.encode(TEXT)
    for batch in (int(b) for b in args.batch.split(",") if b):
        stepper = _Stepper(loaded.model, words, batch)
        print(f"{loaded.info.name}, {args.quantization}, batch {batch}: {stepper.seconds_per_step(args.steps) * 1e3:.1f} ms "
              f"per step, {torch.get_num_threads()} threads")  # fmt: skip
        if batch == 1:
            _against_bandwidth(loaded.model, stepper, args.steps, args.rounds)
        if apart is not None:
            baseline = _Stepper(apart.model, words, batch)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(stepper.seconds_per_step(args.steps))
                theirs.append(baseline.seconds_per_step(args.steps))
            ours_ms, theirs_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
            print(f"  medians of {args.rounds} alternating rounds: this forward {ours_ms:.1f} ms, transformers' "
                  f"{theirs_ms:.1f} ms: {theirs_ms / ours_ms:.2f}x")  # fmt: skip
        print(stepper.table(args.steps))


if __name__ == "__main__":
    main()
