"""Helpers for driving a real engine from synchronous tests."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import torch

from models import LoadedModel, native
from models.forward import Forward
from models.loader import cache_root
from models.quant_weights import GROUP_SIZE, Int4Weight
from models.runner import ModelRunner
from server.engine import Engine
from server.request import Event, FinishReason, SamplingParams
from server.scheduler import Budgets

T = TypeVar("T")

BUDGETS = Budgets(max_batch_size=64, max_batch_tokens=65536, max_prefill_tokens=8192, max_waiting=256)


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    error: str | None
    events: list[Event]


async def collect(stream: AsyncIterator[Event]) -> Result:
    events = [event async for event in stream]
    last = events[-1]
    return Result(
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        finish_reason=last.finish_reason,
        error=last.error,
        events=events,
    )


def around_forward(monkeypatch: pytest.MonkeyPatch, around: Callable[[Forward, Callable[[], torch.Tensor]], torch.Tensor]) -> None:
    """Route every model forward of every runner through `around(inputs, run)`, where `run()` computes it.

    `ModelRunner._forward` is the only code that runs the model, whichever forward it runs (models/decoder.py's
    or transformers'), so spies and injected faults go there."""
    original = ModelRunner._forward

    def routed(self: ModelRunner, inputs: Forward, every_position: bool) -> torch.Tensor:
        return around(inputs, lambda: original(self, inputs, every_position))

    monkeypatch.setattr(ModelRunner, "_forward", routed)


def run_with_engine(
    loaded: LoadedModel,
    scenario: Callable[[Engine], Awaitable[T]],
    budgets: Budgets = BUDGETS,
    prefix_cache_bytes: int | None = None,
) -> T:
    """Start an engine, run `scenario(engine)` on a fresh event loop, always shut the engine down."""

    async def main() -> T:
        engine = Engine(loaded, budgets, prefix_cache_bytes)
        engine.start()
        try:
            return await asyncio.wait_for(scenario(engine), timeout=600)
        finally:
            await engine.shutdown(drain=False)

    return asyncio.run(main())


def require_native() -> None:
    """Skip the calling test where models/native.cpp did not build or load (no compiler, another CPU)."""
    if not native.load(cache_root()):
        pytest.skip("models/native.cpp did not build or load here (the log says why)")


def generate_alone(loaded: LoadedModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Result]:
    """Each prompt by itself, one after another, through the engine."""

    async def scenario(engine: Engine) -> list[Result]:
        return [await collect(engine.submit(p, sp)) for p, sp in zip(prompts, params, strict=True)]

    return run_with_engine(loaded, scenario)


def generate_together(loaded: LoadedModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Result]:
    """All prompts submitted at once."""

    async def scenario(engine: Engine) -> list[Result]:
        streams = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    return run_with_engine(loaded, scenario)


@dataclass(eq=False)
class Row:
    """A row as the runner and speculation read it: a prompt, its output so far, its parameters."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=64, temperature=0))

    beam = None  # not part of a beam search

    def suppressed_token_ids(self) -> frozenset[int]:
        return frozenset({0}) if len(self.output_ids) < self.params.min_tokens else frozenset()

    def allowed_tokens(self) -> None:
        return None


class PrefillRecorder:
    """Prompt tokens each engine step computes (install `record` with `around_forward`): every forward but a
    plain decode step's. A left-padded prefill group's are counted from its position ids (a row's last position
    less its first, plus one: pads sit at 0 before its real positions). A flattened forward (a decode step
    reading prompts, `decode_with`) puts the decode rows' tokens first, one each, and the prompts' after them,
    unpadded: all but the decode rows' are counted."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.decoding = False
        self.decode_rows = 0  # during a decode step reading prompts: its decode tokens, which come first
        self.prefilled: dict[int, int] = defaultdict(int)
        self.prefill_calls = 0

    def watch(self, engine: Engine) -> None:
        """Record this engine's prefills: every forward but those its runner's decode step makes."""
        runner = engine._runner
        decode, decode_with = runner.decode, runner.decode_with

        def marked() -> object:
            self.decoding = True
            try:
                return decode()
            finally:
                self.decoding = False

        def marked_with(parts: object, decode: bool = True) -> object:
            self.decode_rows = len(runner.rows) if decode else 0
            try:
                return decode_with(parts, decode=decode)
            finally:
                self.decode_rows = 0

        runner.decode, runner.decode_with = marked, marked_with
        self.engine = engine

    def record(self, inputs: Forward, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """For `around_forward`: count the prompt tokens of this forward, then run it."""
        if self.engine is not None and not self.decoding:
            self.prefill_calls += 1
            positions = inputs.position_ids  # [rows, q]; pads sit at 0 before a row's real positions
            if inputs.last is not None:  # flattened: [1, decode rows + the prompts' tokens]
                tokens = positions.shape[1] - self.decode_rows
            else:
                tokens = int((positions[:, -1] - positions[:, 0] + 1).sum())
            self.prefilled[self.engine.steps] += tokens
        return run()


def int4_of_quantized_inputs(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """What the AVX2 int4 kernel computes, in float64: each group of 32 inputs quantized to 16 bits (d = max |x| /
    32767, x_i = x / d to nearest, ties to even), sum over groups of s d sum(x_i q) + (z - 8 s) sum(x); s and z as
    bfloat16. x [rows, in] -> [rows, out]."""
    rows, groups = x.shape[0], x.shape[1] // GROUP_SIZE
    g = x.float().reshape(rows, groups, GROUP_SIZE)  # [rows, groups, 32]
    largest = g.abs().amax(-1)  # [rows, groups]
    inverse = torch.where(largest > 0, 32767 / largest, torch.zeros_like(largest))
    x_i = (g * inverse[..., None]).round()  # float32 products rounded half to even, as the kernel's
    d = (largest / 32767).double()
    codes = weight.codes.reshape(-1, groups, GROUP_SIZE).double()  # [out, groups, 32]
    s = weight.scales.to(torch.bfloat16).double()  # [out, groups]
    z = weight.zeros.to(torch.bfloat16).double()
    dots = torch.einsum("rgk,ogk->rog", x_i.double(), codes)  # [rows, out, groups]
    return torch.einsum("rog,og,rg->ro", dots, s, d) + torch.einsum("rg,og->ro", g.sum(-1).double(), z - 8 * s)
