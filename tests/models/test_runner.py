"""The runner's decode step reading prompts in the same forward (`decode_with`) gives every row what it gets alone."""

from __future__ import annotations

import pytest

from models import LoadedModel
from models.runner import ModelRunner, Sampled
from models.types import Part
from server.request import SamplingParams
from tests.helpers import Row

CHUNK = 7


def scored(max_tokens: int = 64) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=3)


def assert_same(got: list[Sampled], expected: list[Sampled]) -> None:
    """Same tokens, same top tokens, and scores equal to float32 rounding (a matrix product over more tokens
    may sum in another order)."""
    assert [s.token for s in got] == [s.token for s in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.logprobs.logprob == pytest.approx(theirs.logprobs.logprob, abs=1e-4)
        assert [t for t, _ in mine.logprobs.top] == [t for t, _ in theirs.logprobs.top]
        assert [p for _, p in mine.logprobs.top] == pytest.approx([p for _, p in theirs.logprobs.top], abs=1e-4)


def alone(tiny: LoadedModel, prompt: list[int], tokens: int) -> list[Sampled]:
    """`tokens` samples of `prompt` prefilled and decoded in a runner of its own."""
    runner: ModelRunner[Row] = ModelRunner(tiny.model, max_rows=1)
    row = Row(list(prompt), params=scored())
    samples = runner.prefill([row])
    row.output_ids.append(samples[0].token)
    while len(samples) < tokens:
        (sampled,) = runner.decode()
        row.output_ids.append(sampled.token)
        samples.append(sampled)
    return samples


def test_a_decode_step_reading_prompts_gives_every_row_what_it_gets_alone(tiny: LoadedModel) -> None:
    """Three running rows of different lengths (so with left padding) decode while a 40-token prompt is read in
    chunks of 7, and at the second step two newcomers ride whole. Every row's tokens and scores, the running
    rows', the newcomers' and the long prompt's, before and after they join, equal those of that row alone."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    newcomers = [[30, 31, 32, 33], [40 + i for i in range(12)]]
    long_prompt = [20 + i % 50 for i in range(40)]
    runner: ModelRunner[Row] = ModelRunner(tiny.model, max_rows=8)
    rows = [Row(list(p), params=scored()) for p in prompts]
    riders = [Row(list(p), params=scored()) for p in newcomers]
    long = Row(long_prompt, params=scored())
    got: dict[int, list[Sampled]] = {id(row): [] for row in [*rows, *riders, long]}

    def keep(step_rows: list[Row], samples: list[Sampled | None]) -> None:
        for row, sampled in zip(step_rows, samples, strict=True):
            if sampled is not None:
                row.output_ids.append(sampled.token)
                got[id(row)].append(sampled)

    keep(rows, runner.prefill(rows))
    read, step = 0, 0
    while read < len(long_prompt):
        tokens = min(CHUNK, len(long_prompt) - read)
        parts = [Part(long, tokens)] + ([Part(row, len(row.prompt_ids)) for row in riders] if step == 1 else [])
        step_rows = list(runner.rows)
        samples, firsts = runner.decode_with(parts)
        keep([*step_rows, *(part.row for part in parts)], [*samples, *firsts])
        read, step = read + tokens, step + 1
    assert [len(got[id(row)]) for row in riders] == [step - 1] * 2 and len(got[id(long)]) == 1  # from step 1 on
    for _ in range(3):  # the long row decodes with the others
        step_rows = list(runner.rows)
        keep(step_rows, runner.decode())
    assert runner.rows == [*rows, *riders, long]
    for row in [*rows, *riders, long]:
        assert_same(got[id(row)], alone(tiny, row.prompt_ids, len(got[id(row)])))


def test_a_step_of_parts_alone_reads_them_without_a_decode(tiny: LoadedModel) -> None:
    """With no running row, `decode_with` reads the parts alone; a prompt not read to its end samples nothing."""
    runner: ModelRunner[Row] = ModelRunner(tiny.model, max_rows=4)
    short, long = Row([3, 4, 5, 6], params=scored()), Row([20 + i for i in range(20)], params=scored())
    samples, firsts = runner.decode_with([Part(short, 4), Part(long, 12)])
    assert samples == [] and firsts[1] is None and runner.staged == [long]
    assert_same([firsts[0]], alone(tiny, short.prompt_ids, 1))
